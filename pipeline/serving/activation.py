"""What a served model answers: its logits turned into the probabilities its contract names.

Used by the python backend inside Triton, by the worker for a model on a native backend (which
answers logits), and by the inference benchmark's in-process run, so all compute the same
thing.
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


def served(contract: ModelContract, logits: torch.Tensor) -> torch.Tensor:
    """What the python backend answers: the probabilities, or for a contract that names a
    native backend (served here where that backend is missing) the logits as that backend
    would answer them, so the worker treats both alike."""
    if contract.serves_logits:
        return logits.to(DTYPES[contract.output.dtype]).contiguous()
    return probabilities(contract, logits)
