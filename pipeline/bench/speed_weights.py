"""Untrained weights of the demo architectures, for speed measurements only.

    python -m pipeline.bench.speed_weights [--model-repository triton_models] [--force]

Throughput does not depend on the weights' values, and a machine lent for minutes (the GPU
runs on the benchmarks page) should not spend them training, nor load files written by a
newer torch than its own. Each model gets its architecture with initial weights, written by the
local torch in its contract's format; model.json says they are untrained. Never use these for
answers. Trained weights (demo or real) already in the repository are not replaced without
--force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch import nn

from pipeline.core.contract import discover_contracts
from pipeline.core.fsutil import atomic_write_bytes
from pipeline.demo.export import exported
from pipeline.demo.nets import SmallCT3DNet, lesion_net, mednist_net

UNTRAINED = "untrained, for speed measurements only"


def trained_weights(repository: Path) -> list[Path]:
    """Weights in ``repository`` that these would replace and that are not speed weights
    themselves (demo or real ones, or weights without a description)."""
    found = []
    for contract in discover_contracts(repository).values():
        weights = repository / contract.name / "1" / contract.weights
        if not weights.exists():
            continue
        try:
            kind = json.loads(weights.with_suffix(".json").read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != UNTRAINED:
            found.append(weights)
    return found


def write(repository: Path) -> list[Path]:
    contracts = discover_contracts(repository)
    nets: dict[str, nn.Module] = {
        "mednist_classifier": mednist_net(contracts["mednist_classifier"]),
        "ct_covid_classifier": SmallCT3DNet(),
        "ct_lesion_segmentation": lesion_net(contracts["ct_lesion_segmentation"]),
    }
    written = []
    for name, net in nets.items():
        contract = contracts[name]
        weights = repository / name / "1" / contract.weights
        atomic_write_bytes(weights, exported(net, contract, contract.weights_format))
        description = json.dumps({"model": name, "kind": UNTRAINED}) + "\n"
        atomic_write_bytes(weights.with_suffix(".json"), description.encode())
        written.append(weights)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("triton_models"))
    parser.add_argument(
        "--force", action="store_true", help="Replace trained weights too (they are lost)."
    )
    args = parser.parse_args()
    if not args.force and (kept := trained_weights(args.model_repository)):
        names = ", ".join(str(p) for p in kept)
        sys.exit(
            f"error: would replace trained weights ({names}); use a copy of the repository "
            "(--model-repository) or --force"
        )
    for path in write(args.model_repository):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
