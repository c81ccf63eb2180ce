"""A segmentation model's sliding window over a whole volume, the same on both sides.

The worker runs it with Triton as the predictor (patches travel to the server, batches of
concurrent studies' patches are formed there); the python backend runs it with the network
itself when a request carries a whole volume (``sliding_window.runs_on: triton``), so the
volume crosses to the server once and the blending happens beside the model, on its GPU in
production. One function keeps the two answers the same.

The window is MONAI's (``sliding_window_inference``: its patch positions, their order, its
batches, its importance map, its sums), streamed: the blended answer comes out a slab of the
first spatial axis at a time, each slab as soon as no later patch reaches it, so the sums and
weights are held for a patch's depth of the volume, not for all of it. A 2,000-slice CT's
window then holds some 200 MB beside the volume instead of two more volumes; every voxel's
sum takes the same additions in the same order as MONAI's, so the answer is MONAI's to the bit
(tests/test_window.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from pipeline.core.contract import ModelContract, SlidingWindow
from pipeline.serving.activation import DTYPES, probabilities

Predictor = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()  # around each step of the generator, not across its yields
def stream_volume(
    volume: torch.Tensor, roi: tuple[int, ...], window: SlidingWindow, predictor: Predictor
) -> Iterator[tuple[int, torch.Tensor]]:
    """The blended answers of ``predictor`` over ``volume`` (1, channels, *spatial), in slabs
    of the first spatial axis, in order and on the volume's device: ``(first plane, answer)``
    with the answer (1, out channels, planes, *rest of spatial), cropped to the volume's size."""
    spatial = tuple(volume.shape[2:])
    volume = _padded(volume, roi)
    size = tuple(volume.shape[2:])
    slices = dense_patch_slices(size, roi, _steps(size, roi, window.overlap))
    # MONAI's order puts the first axis slowest: patches starting at one plane come together.
    starts = [s[0].start for s in slices] + [size[0]]
    weight = compute_importance_map(roi, mode=window.mode, device=volume.device, dtype=volume.dtype)
    weight = weight[None, None]
    low = 0  # the first plane not yet given out; the buffers begin there
    sums = counts = torch.empty(0)
    for first in range(0, len(slices), window.batch_size):
        group = slices[first : first + window.batch_size]
        answer = predictor(torch.cat([volume[(slice(None), slice(None), *s)] for s in group]))
        answer *= weight
        high = max(s[0].stop for s in group)
        if sums.numel() == 0:
            shape = (1, answer.shape[1], high - low, *size[1:])
            sums = torch.zeros(shape, dtype=volume.dtype, device=volume.device)
            counts = torch.zeros((1, 1, *shape[2:]), dtype=volume.dtype, device=volume.device)
        elif high - low > sums.shape[2]:
            sums, counts = _grown(sums, high - low), _grown(counts, high - low)
        for s, patch in zip(group, answer, strict=True):
            at = (slice(None), slice(None), slice(s[0].start - low, s[0].stop - low), *s[1:])
            sums[at] += patch
            counts[at] += weight
        done = starts[first + len(group)]  # no later patch reaches a plane before this one
        if done > low:
            ready = sums[:, :, : done - low] / counts[:, :, : done - low]
            if low < spatial[0]:
                yield low, _cropped(ready, spatial, low)
            sums, counts = sums[:, :, done - low :].clone(), counts[:, :, done - low :].clone()
            low = done


def infer_volume(
    volume: torch.Tensor, roi: tuple[int, ...], window: SlidingWindow, predictor: Predictor
) -> torch.Tensor:
    """The blended answers of ``predictor`` over ``volume`` (1, channels, *spatial) as one
    tensor, on the volume's device, of the volume's spatial size."""
    return torch.cat([slab for _, slab in stream_volume(volume, roi, window, predictor)], dim=2)


def _padded(volume: torch.Tensor, roi: tuple[int, ...]) -> torch.Tensor:
    """A volume thinner than a patch padded at its far end with background, as in training
    (MONAI would pad both sides, which the demo weights never saw); cropped back after."""
    pad: list[int] = []
    for size, dim in zip(reversed(roi), reversed(volume.shape[2:]), strict=True):
        pad += [0, max(0, size - dim)]
    return torch.nn.functional.pad(volume, pad, value=0.0) if any(pad) else volume


def _steps(size: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> tuple[int, ...]:
    """MONAI's scan interval: ``roi * (1 - overlap)``, a whole patch where the volume is one."""
    return tuple(
        r if s == r else max(1, int(r * (1 - overlap))) for s, r in zip(size, roi, strict=True)
    )


def _grown(buffer: torch.Tensor, planes: int) -> torch.Tensor:
    """``buffer`` with zeroed planes added on the first spatial axis, ``planes`` in all."""
    shape = list(buffer.shape)
    shape[2] = planes - shape[2]
    return torch.cat([buffer, buffer.new_zeros(shape)], dim=2)


def _cropped(slab: torch.Tensor, spatial: tuple[int, ...], low: int) -> torch.Tensor:
    """The part of a slab starting at plane ``low`` that lies within ``spatial``."""
    slab = slab.narrow(2, 0, min(slab.shape[2], spatial[0] - low))
    for axis, size in enumerate(spatial[1:], start=3):
        slab = slab.narrow(axis, 0, size)  # a view: no copy
    return slab


def served_volume(
    contract: ModelContract, net: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor
) -> torch.Tensor:
    """What the python backend answers for a whole volume, on the volume's device: each patch's
    probabilities as a patch request would get them (in the output's dtype), blended in
    float32 a slab at a time, each slab then in the output's dtype (half the bytes to copy back
    from a GPU): the volume's answer is the only whole-volume buffer."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return probabilities(contract, net(batch)).float()

    roi = contract.input.shape[1:]
    out: torch.Tensor | None = None  # allocated with the first slab: its channels known
    for low, slab in stream_volume(volume, roi, contract.sliding_window, forward):
        if out is None:
            shape = (1, slab.shape[1], *volume.shape[2:])
            out = torch.empty(shape, dtype=DTYPES[contract.output.dtype], device=volume.device)
        out[:, :, low : low + slab.shape[2]] = slab
    assert out is not None  # a volume has at least one plane
    return out


def patch_count(spatial: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """How many patches :func:`stream_volume` runs over a volume of ``spatial`` size."""
    padded = tuple(max(s, r) for s, r in zip(spatial, roi, strict=True))
    return len(dense_patch_slices(padded, roi, _steps(padded, roi, overlap)))
