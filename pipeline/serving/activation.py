"""What a served model answers: its logits turned into the probabilities its contract names.

Used by the python backend inside Triton, and by the inference benchmark's in-process run, so
the two compute the same thing.
"""

from __future__ import annotations

import torch

from pipeline.core.contract import Activation, ModelContract

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def probabilities(contract: ModelContract, logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the labels (without the background's channel where the contract leaves it
    out), or for a sigmoid model both labels' probabilities; in the output's dtype."""
    if contract.activation is Activation.SOFTMAX:
        p = torch.softmax(logits.float(), dim=1)
        if contract.omits_background:  # the worker takes it as 1 - the others' sum
            p = p[:, 1:]
    else:  # one logit, the probability of the positive label
        positive = torch.sigmoid(logits.float().reshape(len(logits), 1))
        p = torch.cat([1.0 - positive, positive], dim=1)
    return p.to(DTYPES[contract.output.dtype]).contiguous()
