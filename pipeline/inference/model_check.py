"""``models check NAME``: the model answered on the running Triton, with a synthetic input of
its contract's shape; what came back (shape, dtype, time), or why nothing did."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.contract import ModelContract
from pipeline.inference.triton_client import TritonClient


@dataclass(frozen=True)
class Checked:
    shape: tuple[int, ...]  # the output, batch first
    dtype: str  # as served (the contract's output dtype)
    milliseconds: float
    version: str
    finite: bool  # no NaN or infinity in the answer


def check_model(client: TritonClient, contract: ModelContract, batch: int = 2) -> Checked:
    """One request of ``batch`` random inputs; the error of the client when it fails (the
    model not loaded, a shape the model refuses)."""
    x = np.random.default_rng(0).random((batch, *contract.input.shape), np.float32)
    out = client.infer(contract, x)
    return Checked(
        shape=tuple(out.probabilities.shape),
        dtype=contract.output.dtype,
        milliseconds=round(out.milliseconds, 1),
        version=out.model_version,
        finite=bool(np.isfinite(out.probabilities).all()),
    )
