"""A segmentation model's sliding window over a whole volume, the same on both sides.

The worker runs it with Triton as the predictor (patches travel to the server, batches of
concurrent studies' patches are formed there); the python backend runs it with the network
itself when a request carries a whole volume (``sliding_window.runs_on: triton``), so the
volume crosses to the server once and the blending happens beside the model, on its GPU in
production. One function keeps the two answers the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from pipeline.core.contract import ModelContract, SlidingWindow
from pipeline.serving.activation import DTYPES, probabilities


def infer_volume(
    volume: torch.Tensor,
    roi: tuple[int, ...],
    window: SlidingWindow,
    predictor: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The blended answers of ``predictor`` over ``volume`` (batch, channels, *spatial), on
    the volume's device, cropped to its spatial size."""
    spatial = tuple(volume.shape[2:])
    # A volume thinner than a patch is padded at its far end with background, as in training
    # (MONAI would pad both sides, which the demo weights never saw), and cropped back after.
    pad: list[int] = []
    for size, dim in zip(reversed(roi), reversed(spatial), strict=True):
        pad += [0, max(0, size - dim)]
    if any(pad):
        volume = torch.nn.functional.pad(volume, pad, value=0.0)
    with torch.inference_mode():
        blended = sliding_window_inference(
            volume,
            roi_size=roi,
            sw_batch_size=window.batch_size,
            predictor=predictor,
            overlap=window.overlap,
            mode=window.mode,
            padding_mode="constant",
            cval=0.0,
        )
    out = torch.as_tensor(blended)
    for axis, size in enumerate(spatial, start=2):
        out = out.narrow(axis, 0, size)  # a view: no copy
    return out


def served_volume(
    contract: ModelContract, net: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor
) -> torch.Tensor:
    """What the python backend answers for a whole volume, on the volume's device: each patch's
    probabilities as a patch request would get them (in the output's dtype), blended in
    float32, then in the output's dtype again (half the bytes to copy back from a GPU)."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return probabilities(contract, net(batch)).float()

    roi = contract.input.shape[1:]
    blended = infer_volume(volume, roi, contract.sliding_window, forward)
    return blended.to(DTYPES[contract.output.dtype])


def patch_count(spatial: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """How many patches :func:`infer_volume` runs over a volume of ``spatial`` size: MONAI's
    windows, a step of ``roi * (1 - overlap)`` (a whole patch where the padded volume is one)."""
    padded = tuple(max(s, r) for s, r in zip(spatial, roi, strict=True))
    steps = tuple(
        r if s == r else max(1, int(r * (1 - overlap))) for s, r in zip(padded, roi, strict=True)
    )
    return len(dense_patch_slices(padded, roi, steps))
