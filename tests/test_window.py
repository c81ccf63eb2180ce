"""The streamed sliding window: MONAI's answer to the bit, a slab at a time."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from monai.inferers import sliding_window_inference

from pipeline.core.contract import SlidingWindow
from pipeline.serving.window import infer_volume, stream_volume


def _net(batch: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network: two channels that depend on each voxel's
    neighbourhood, so overlapping patches disagree and the blending shows."""
    smooth = torch.nn.functional.avg_pool3d(batch, 3, stride=1, padding=1)
    return torch.cat([torch.sigmoid(4 * smooth - 2), torch.tanh(batch * smooth)], dim=1)


def _monai(volume: torch.Tensor, roi: tuple[int, ...], window: SlidingWindow) -> torch.Tensor:
    with torch.inference_mode():
        out = sliding_window_inference(
            volume,
            roi_size=roi,
            sw_batch_size=window.batch_size,
            predictor=_net,
            overlap=window.overlap,
            mode=window.mode,
            padding_mode="constant",
            cval=0.0,
        )
    return torch.as_tensor(out)


@pytest.mark.parametrize(
    ("shape", "overlap", "batch", "mode"),
    [
        ((70, 53, 41), 0.25, 4, "gaussian"),
        ((70, 53, 41), 0.5, 3, "gaussian"),
        ((40, 33, 90), 0.25, 1, "constant"),
        ((16, 16, 16), 0.25, 4, "gaussian"),  # exactly one patch
        ((97, 20, 30), 0.25, 16, "gaussian"),  # a batch reaches over several planes
    ],
)
def test_the_streamed_window_gives_monais_answer_to_the_bit(
    shape: tuple[int, ...], overlap: float, batch: int, mode: Literal["gaussian", "constant"]
) -> None:
    torch.manual_seed(0)
    volume = torch.rand((1, 1, *shape))
    roi = (16, 16, 16)
    window = SlidingWindow(overlap=overlap, batch_size=batch, mode=mode)
    with torch.inference_mode():
        streamed = infer_volume(volume, roi, window, _net)
    assert streamed.shape == (1, 2, *shape)
    assert torch.equal(streamed, _monai(volume, roi, window))


def test_a_volume_thinner_than_a_patch_is_padded_at_its_far_end() -> None:
    """As the demo weights were trained: background after the volume, not on both sides."""
    volume = torch.rand((1, 1, 20, 10, 24))
    window = SlidingWindow(overlap=0.25, batch_size=4, mode="gaussian")
    with torch.inference_mode():
        streamed = infer_volume(volume, (16, 16, 16), window, _net)
        padded = torch.nn.functional.pad(volume, [0, 0, 0, 6, 0, 0])
        expected = _monai(padded, (16, 16, 16), window)[:, :, :, :10]
    assert torch.equal(streamed, expected)


def test_slabs_come_out_while_the_window_is_still_running() -> None:
    """The answer for the first planes is given out before the last patches are run: the
    window holds a patch's depth of sums, not the volume's."""
    calls = 0

    def counting(batch: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return _net(batch)

    volume = torch.rand((1, 1, 96, 32, 32))
    window = SlidingWindow(overlap=0.25, batch_size=1, mode="gaussian")
    seen = []
    with torch.inference_mode():
        for low, slab in stream_volume(volume, (16, 16, 16), window, counting):
            seen.append((low, slab.shape[2], calls))
    total = calls
    assert [low for low, _, _ in seen] == sorted(low for low, _, _ in seen)
    assert sum(planes for _, planes, _ in seen) == 96
    assert seen[0][2] < total / 4  # the first slab after a few of the volume's patches
