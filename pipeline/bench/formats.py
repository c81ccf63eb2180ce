"""Weights formats side by side: each demo network as a torch.export program (``.pt2``), as
ONNX on ONNX Runtime (``.onnx``) and as TorchScript (``.pt``), loaded as the python backend
loads them (:mod:`pipeline.serving.loaders`) and called in-process at batch 1, 4 and 16.

    python -m pipeline.bench.formats [--seconds 3] [--repeats 3] [--batches 1,4,16] [--json F]

Images/s, and the ratio to the torch.export program at the same batch size; the formats are
interleaved within each repeat so that drift hits all alike, and each is written from the same
parameters (:func:`pipeline.demo.export.exported`), so they compute the same network. On this
machine's CPU, or on its GPU where torch has one (ONNX Runtime on CUDA where its GPU build is
installed, else on the CPU: the JSON names each format's device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.infer import _device, _inputs, _rate
from pipeline.core.contract import ModelContract, WeightsFormat, discover_contracts
from pipeline.demo.export import SUFFIX, exported, from_program
from pipeline.serving.loaders import Net, load_net

MODELS = ("mednist_classifier", "ct_lesion_segmentation")
FORMATS = (WeightsFormat.TORCH_EXPORT, WeightsFormat.ONNX, WeightsFormat.TORCHSCRIPT)


def _calls(
    repository: Path, contract: ModelContract, folder: Path, batch: int
) -> dict[str, Callable[[], int]]:
    """A call per format, each answering a batch of ``batch`` random inputs."""
    net = from_program(contract, repository / contract.name / "1" / contract.weights)
    device = _device()
    x = torch.from_numpy(_inputs(contract, batch))
    calls = {}
    for fmt in FORMATS:
        weights = folder / f"{contract.name}{SUFFIX[fmt]}"
        if not weights.exists():
            weights.write_bytes(exported(net, contract, fmt))
        served = load_net(contract.model_copy(update={"weights": weights.name}), weights, device)
        calls[fmt.value] = _timed(served, x, device)
    return calls


def _timed(net: Net, x: torch.Tensor, device: torch.device) -> Callable[[], int]:
    """One forward pass of ``x``, from host memory to host memory as the backend does."""

    def call() -> int:
        with torch.inference_mode():
            net(x.to(device)).cpu()
        return len(x)

    return call


def run(args: argparse.Namespace) -> dict[str, Any]:
    repository = Path(args.model_repository).resolve()
    contracts = discover_contracts(repository)
    threads = torch.get_num_threads()
    figures: dict[str, Any] = {"device": str(_device()), "torch_threads": threads}
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        for name in args.models:
            rows: dict[str, Any] = {}
            for batch in args.batches:
                calls = _calls(repository, contracts[name], Path(tmp), batch)
                rates: dict[str, list[float]] = {k: [] for k in calls}
                for _ in range(args.repeats):
                    for key, call in calls.items():
                        rates[key].append(_rate(call, args.seconds, threads))
                med = {k: statistics.median(v) for k, v in rates.items()}
                base = med[WeightsFormat.TORCH_EXPORT.value]
                for key, value in med.items():
                    rows[f"{key} b{batch}"] = {
                        "images_per_s": round(value, 1),
                        "x_torch_export": round(value / base, 2),
                    }
            figures[name] = rows
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-repository",
        default=os.environ.get("PIPELINE_TRITON__MODEL_REPOSITORY", "triton_models"),
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="Per measurement.")
    parser.add_argument("--repeats", type=int, default=3, help="Median of this many.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument(
        "--batches",
        type=lambda v: [int(b) for b in v.split(",")],
        default=[1, 4, 16],
        help="Comma-separated batch sizes (4: the lesion model's sliding window batch).",
    )
    parser.add_argument(
        "--models",
        type=lambda v: [m for m in v.split(",") if m],
        default=list(MODELS),
        help="Comma-separated demo models.",
    )
    args = parser.parse_args()
    figures = run(args)
    print(f"device: {figures['device']}, {figures['torch_threads']} torch threads")
    for model, rows in figures.items():
        if isinstance(rows, dict):
            print(model)
            for key, row in rows.items():
                print(
                    f"  {key:>16}: {row['images_per_s']:8.1f} images/s  "
                    f"{row['x_torch_export']:.2f}x torch.export"
                )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
