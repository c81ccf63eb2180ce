"""`models build-demo`: train small TorchScript weights on synthetic data, offline, on CPU.

Training inputs go through the same files and the same convert stage the worker uses
(PNG/NIfTI written to disk, loaded, preprocessed by the contract), so the weights learn
exactly what the pipeline will feed them. Seeds are fixed: the same weights every time.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import DenseNet121
from torch import nn

from pipeline.contract import ModelContract, load_contract
from pipeline.convert import load, preprocessor, to_model_input
from pipeline.demo.synthetic import MEDNIST_LABELS, write_ct_nifti, write_mednist_png
from pipeline.fsutil import atomic_write_bytes, atomic_write_json

Progress = Callable[[str], None]

# Seeds of training samples; tests draw held-out samples from TEST_SEED_BASE upwards.
TRAIN_SEED_BASE = 0
TEST_SEED_BASE = 1_000_000


class SmallCT3DNet(nn.Module):
    """A compact 3D CNN for the 1x192x192x64 contract.

    Global max pooling next to mean pooling lets a few small lesions decide the answer.
    """

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            nn.AvgPool3d(2),
            *block(1, 16),
            nn.MaxPool3d(2),
            *block(16, 32),
            nn.MaxPool3d(2),
            *block(32, 32),
        )
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        out: torch.Tensor = self.head(
            torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1)
        )
        return out


def _dataset(
    contract: ModelContract, files: list[tuple[Path, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    compose = preprocessor(contract)
    xs = [to_model_input(load(path), contract, compose) for path, _ in files]
    return torch.from_numpy(np.stack(xs)), torch.tensor([label for _, label in files])


def _fit(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    batch: int,
    lr: float,
    progress: Progress,
    name: str,
) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(net(x[idx]), y[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            progress(f"{name}: step {step + 1}/{steps} loss {loss.item():.4f}")
    net.eval()


def _save(
    net: nn.Module,
    contract: ModelContract,
    model_dir: Path,
    example: torch.Tensor,
    accuracy: float,
    seconds: float,
) -> Path:
    with torch.no_grad():
        scripted = torch.jit.trace(net, example)  # type: ignore[no-untyped-call]
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    data = buf.getvalue()
    weights = model_dir / "1" / contract.weights
    atomic_write_bytes(weights, data)
    atomic_write_json(
        weights.with_suffix(".json"),
        {
            "model": contract.name,
            "kind": "demo weights trained on synthetic data (pipeline.demo); not for clinical use",
            "sha256": hashlib.sha256(data).hexdigest(),
            "held_out_accuracy": accuracy,
            "training_seconds": round(seconds, 1),
            "torch": torch.__version__,
        },
    )
    return weights


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, binary: bool) -> float:
    with torch.inference_mode():
        out = net(x)
    pred = (out[:, 0] > 0).long() if binary else out.argmax(dim=1)
    return float((pred == y).float().mean())


def build_mednist(model_dir: Path, work: Path, progress: Progress, per_class: int = 120) -> Path:
    contract = load_contract(model_dir)
    started = time.monotonic()

    def files(base: int, n: int) -> list[tuple[Path, int]]:
        return [
            (write_mednist_png(work / f"m{base + i}_{k}.png", label, base + i * 7 + k), k)
            for i in range(n)
            for k, label in enumerate(MEDNIST_LABELS)
        ]

    x, y = _dataset(contract, files(TRAIN_SEED_BASE, per_class))
    xt, yt = _dataset(contract, files(TEST_SEED_BASE - 50_000, 10))
    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(contract.labels))
    _fit(
        net,
        x,
        y,
        nn.functional.cross_entropy,
        steps=120,
        batch=32,
        lr=1e-3,
        progress=progress,
        name=contract.name,
    )
    acc = _accuracy(net, xt, yt, binary=False)
    progress(f"{contract.name}: held-out accuracy {acc:.3f}")
    return _save(net, contract, model_dir, x[:1], acc, time.monotonic() - started)


def build_covid(model_dir: Path, work: Path, progress: Progress, per_class: int = 40) -> Path:
    contract = load_contract(model_dir)
    started = time.monotonic()

    def files(base: int, n: int) -> list[tuple[Path, int]]:
        return [
            (write_ct_nifti(work / f"c{base + i}_{k}.nii.gz", bool(k), base + 2 * i + k), k)
            for i in range(n)
            for k in (0, 1)
        ]

    x, y = _dataset(contract, files(TRAIN_SEED_BASE, per_class))
    xt, yt = _dataset(contract, files(TEST_SEED_BASE - 50_000, 8))
    torch.manual_seed(0)
    net = SmallCT3DNet()

    def bce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(out[:, 0], target.float())

    _fit(net, x, y, bce, steps=150, batch=8, lr=3e-3, progress=progress, name=contract.name)
    acc = _accuracy(net, xt, yt, binary=True)
    progress(f"{contract.name}: held-out accuracy {acc:.3f}")
    return _save(net, contract, model_dir, x[:1], acc, time.monotonic() - started)


BUILDERS: dict[str, Callable[[Path, Path, Progress], Path]] = {
    "mednist_classifier": build_mednist,
    "ct_covid_classifier": build_covid,
}


def build_demo(
    repository: Path, progress: Progress, only: list[str] | None = None, force: bool = False
) -> dict[str, Path]:
    """Train and write demo weights for every shipped model (or ``only`` those)."""
    built: dict[str, Path] = {}
    for name, builder in BUILDERS.items():
        if only and name not in only:
            continue
        model_dir = repository / name
        target = model_dir / "1" / load_contract(model_dir).weights
        if target.exists() and not force:
            progress(f"{name}: {target} exists, kept (use --force to retrain)")
            built[name] = target
            continue
        with tempfile.TemporaryDirectory(prefix=f"demo-{name}-") as work:
            built[name] = builder(model_dir, Path(work), progress)
        progress(f"{name}: wrote {built[name]}")
    return built
