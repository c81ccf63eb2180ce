"""`models build-demo`: train small weights on synthetic data, offline, on CPU, written as
torch.export programs.

Training inputs go through the same files and the same convert stage the worker uses
(PNG/NIfTI written to disk, loaded, preprocessed by the contract), so the weights learn
exactly what the pipeline will feed them. Seeds are fixed: the same weights every time.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from pipeline.convert.images import load, preprocessor, to_model_input
from pipeline.core.contract import ModelContract, load_contract
from pipeline.core.fsutil import atomic_write_bytes, atomic_write_json
from pipeline.demo.export import exported, from_torchscript
from pipeline.demo.nets import SmallCT3DNet, lesion_net, mednist_net
from pipeline.demo.synthetic import (
    MEDNIST_LABELS,
    lesion_phantom,
    write_ct_nifti,
    write_mednist_png,
)

Progress = Callable[[str], None]

# Seeds of training samples; tests draw held-out samples from TEST_SEED_BASE upwards.
TRAIN_SEED_BASE = 0
TEST_SEED_BASE = 1_000_000


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
    accuracy: float,
    seconds: float,
) -> Path:
    data = exported(net, contract, contract.weights_format)
    weights = model_dir / "1" / contract.weights
    atomic_write_bytes(weights, data)
    atomic_write_json(
        weights.with_suffix(".json"),
        {
            "model": contract.name,
            "kind": "demo weights trained on synthetic data (pipeline.demo); not for clinical use",
            "sha256": hashlib.sha256(data).hexdigest(),
            "held_out_accuracy" if contract.task == "classification" else "held_out_dice": accuracy,
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
    net = mednist_net(contract)
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
    return _save(net, contract, model_dir, acc, time.monotonic() - started)


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
    return _save(net, contract, model_dir, acc, time.monotonic() - started)


def _lesion_sample(
    contract: ModelContract, seed: int, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phantom preprocessed as the worker will (padded to at least one patch), its mask."""
    hu, mask, affine = lesion_phantom(seed, scale=scale)
    x = preprocessor(contract)(MetaTensor(hu[np.newaxis].astype(np.float32), affine=affine))
    patch = contract.input.shape[1:]
    pad = [(0, 0)] + [(0, max(0, p - n)) for p, n in zip(patch, hu.shape, strict=True)]
    return np.pad(np.asarray(x), pad), np.pad(mask[np.newaxis], pad), affine


def _patches(
    xs: list[np.ndarray],
    ys: list[np.ndarray],
    patch: tuple[int, ...],
    n: int,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches, a third of them centred on a lesion voxel: the rest teach what is not
    a lesion (tissue outside the lungs looks the same, also at the volume's edges)."""
    bx, by = [], []
    for k in range(n):
        i = int(rng.integers(len(xs)))
        x, y = xs[i], ys[i]
        shape = x.shape[1:]
        lesion = np.argwhere(y[0])
        if k % 3 == 0 and len(lesion):
            centre = lesion[rng.integers(len(lesion))] + rng.integers(-8, 9, 3)
        else:
            centre = np.array([rng.integers(0, s) for s in shape])
        lo = [
            int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, shape, strict=True)
        ]
        sl = (slice(None), *[slice(a, a + p) for a, p in zip(lo, patch, strict=True)])
        bx.append(x[sl])
        by.append(y[sl])
    return torch.from_numpy(np.stack(bx)), torch.from_numpy(np.stack(by).astype(np.int64))


def _dice(net: nn.Module, x: np.ndarray, y: np.ndarray, patch: tuple[int, ...]) -> float:
    with torch.inference_mode():
        prob = sliding_window_inference(
            torch.from_numpy(x[np.newaxis]), patch, 4, net, overlap=0.25, mode="gaussian"
        )
    pred = np.asarray(torch.as_tensor(prob).argmax(1)[0]) > 0
    truth = y[0] > 0
    return float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum()))


def build_lesion_segmentation(
    model_dir: Path, work: Path, progress: Progress, volumes: int = 24
) -> Path:
    contract = load_contract(model_dir)
    started = time.monotonic()
    patch = contract.input.shape[1:]
    # One chest in six is adult-sized in plane (3 to 5 times wider): patches of air alone and
    # of body tissue alone, which small chests never show, are not lesions either.
    train = [
        _lesion_sample(contract, TRAIN_SEED_BASE + i, 1.0 if i % 6 else 3.0 + (i // 6) % 3)
        for i in range(volumes)
    ]
    held_out = [_lesion_sample(contract, TEST_SEED_BASE - 50_000 + i) for i in range(4)]
    xs, ys = [t[0] for t in train], [t[1] for t in train]
    torch.manual_seed(0)
    net = lesion_net(contract)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    steps = 1500
    net.train()
    for step in range(steps):
        bx, by = _patches(xs, ys, patch, 6, rng)
        opt.zero_grad()
        loss = loss_fn(net(bx), by)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            progress(f"{contract.name}: step {step + 1}/{steps} loss {loss.item():.4f}")
    net.eval()
    dice = float(np.mean([_dice(net, x, y, patch) for x, y, _ in held_out]))
    progress(f"{contract.name}: held-out Dice {dice:.3f}")
    return _save(net, contract, model_dir, dice, time.monotonic() - started)


BUILDERS: dict[str, Callable[[Path, Path, Progress], Path]] = {
    "mednist_classifier": build_mednist,
    "ct_covid_classifier": build_covid,
    "ct_lesion_segmentation": build_lesion_segmentation,
}


def _converted(contract: ModelContract, model_dir: Path) -> Path | None:
    """Demo weights trained before in TorchScript (``model.pt``), written in the contract's
    format without training again; None where there are none."""
    legacy = model_dir / "1" / "model.pt"
    if contract.weights == legacy.name or not legacy.is_file():
        return None
    try:
        note = json.loads(legacy.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    data = exported(from_torchscript(contract, legacy), contract, contract.weights_format)
    weights = model_dir / "1" / contract.weights
    atomic_write_bytes(weights, data)
    note |= {"sha256": hashlib.sha256(data).hexdigest(), "torch": torch.__version__}
    atomic_write_json(weights.with_suffix(".json"), note)  # the same file name: model.json
    legacy.unlink()
    return weights


def build_demo(
    repository: Path, progress: Progress, only: list[str] | None = None, force: bool = False
) -> dict[str, Path]:
    """Train and write demo weights for every shipped model (or ``only`` those)."""
    built: dict[str, Path] = {}
    for name, builder in BUILDERS.items():
        if only and name not in only:
            continue
        model_dir = repository / name
        contract = load_contract(model_dir)
        target = model_dir / "1" / contract.weights
        if target.exists() and not force:
            progress(f"{name}: {target} exists, kept (use --force to retrain)")
            built[name] = target
            continue
        if not force and (converted := _converted(contract, model_dir)) is not None:
            progress(f"{name}: TorchScript demo weights written as {converted.name}")
            built[name] = converted
            continue
        with tempfile.TemporaryDirectory(prefix=f"demo-{name}-") as work:
            built[name] = builder(model_dir, Path(work), progress)
        progress(f"{name}: wrote {built[name]}")
    return built
