"""Untrained weights of the demo architectures, for speed measurements only.

    python -m pipeline.bench.speed_weights [--model-repository triton_models]

Throughput does not depend on the weights' values, and a machine lent for minutes (the GPU
runs in the README) should not spend them training, nor load TorchScript files written by a
newer torch than its own. Each model gets its architecture with initial weights, traced by the
local torch; model.json says they are untrained. Never use these for answers.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
from torch import nn

from pipeline.contract import discover_contracts
from pipeline.demo.nets import SmallCT3DNet, lesion_net, mednist_net


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
        example = torch.zeros((1, *contract.input.shape))
        with torch.no_grad():
            traced = torch.jit.trace(net.eval(), example)  # type: ignore[no-untyped-call]
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        weights = repository / name / "1" / contract.weights
        weights.write_bytes(buf.getvalue())
        weights.with_suffix(".json").write_text(
            json.dumps({"model": name, "kind": "untrained, for speed measurements only"}) + "\n"
        )
        written.append(weights)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("triton_models"))
    for path in write(parser.parse_args().model_repository):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
