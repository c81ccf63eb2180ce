"""Lesions reported from a segmentation mask: sizes, positions and numbering."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.core.contract import ModelContract, load_contract
from pipeline.inference.segment import label_lesions, transposed

from .conftest import MODEL_REPOSITORY


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: int) -> np.ndarray:
    grid = np.indices(shape)
    squared = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return np.asarray(squared <= radius**2, dtype=bool)


def test_lesions_are_sized_located_and_numbered_largest_first() -> None:
    shape = (120, 100, 80)
    # 0.8 x 0.8 x 2.0 mm voxels, the volume's corner at (-40, -30, 100) mm in RAS.
    affine = np.array([[0.8, 0, 0, -40.0], [0, 0.8, 0, -30.0], [0, 0, 2.0, 100.0], [0, 0, 0, 1.0]])
    small = _ball(shape, (10, 12, 70), 3)  # near one corner
    large = _ball(shape, (105, 85, 8), 6)  # near the opposite one: the box spans the volume
    mask = (small | large).astype(np.uint8)
    mask[60, 50, 40] = 1  # a one-voxel speck, 1.28 microlitres: under the minimum
    voxel_ml = 0.8 * 0.8 * 2.0 / 1000.0

    lesion_map, lesions = label_lesions(mask, affine, min_ml=0.01)

    assert [les.voxels for les in lesions] == [int(large.sum()), int(small.sum())]
    assert [les.volume_ml for les in lesions] == [
        round(float(large.sum()) * voxel_ml, 4),
        round(float(small.sum()) * voxel_ml, 4),
    ]
    assert lesions[0].centre_ras_mm == [-40.0 + 105 * 0.8, -30.0 + 85 * 0.8, 100.0 + 8 * 2.0]
    assert lesions[1].centre_ras_mm == [-40.0 + 10 * 0.8, -30.0 + 12 * 0.8, 100.0 + 70 * 2.0]
    assert lesion_map.shape == shape
    assert (lesion_map == 1).sum() == large.sum() and lesion_map[large].min() == 1
    assert (lesion_map == 2).sum() == small.sum() and lesion_map[small].min() == 2
    assert lesion_map[60, 50, 40] == 0


def test_an_empty_mask_has_no_lesions() -> None:
    lesion_map, lesions = label_lesions(np.zeros((30, 30, 10), np.uint8), np.eye(4))
    assert lesions == [] and not lesion_map.any() and lesion_map.shape == (30, 30, 10)


def test_a_segmentation_output_has_every_label_or_all_but_the_background() -> None:
    base = load_contract(MODEL_REPOSITORY / "ct_lesion_segmentation").model_dump()
    for channels, omits in ((2, False), (1, True)):
        data = {**base, "output": {**base["output"], "shape": (channels, 48, 48, 48)}}
        assert ModelContract.model_validate(data).omits_background is omits
    data = {**base, "output": {**base["output"], "shape": (3, 48, 48, 48)}}
    with pytest.raises(ValidationError, match="without the background"):
        ModelContract.model_validate(data)


def test_a_sparse_volume_transposes_exactly() -> None:
    """SEG frames and the NIfTI mask are made from a sparse mask's non-zero voxels alone (or a
    dense one's copy): either way the whole volume transposed, the corners included."""
    shape = (50, 40, 30)
    lesions = np.zeros(shape, np.uint16)
    lesions[_ball(shape, (3, 4, 25), 3)] = 2
    lesions[_ball(shape, (45, 35, 3), 2)] = 300
    lesions[20, 10, 15] = 1
    assert np.array_equal(transposed(lesions, np.uint16), lesions.T)
    assert transposed(lesions, np.uint16).flags.c_contiguous
    mask = (lesions > 0).astype(np.uint8)
    assert np.array_equal(transposed(mask, np.uint8).T, mask)  # Fortran-ordered, as NIfTI
    assert not transposed(np.zeros(shape, np.uint8), np.uint8).any()
    dense = (np.random.default_rng(0).random(shape) < 0.5).astype(np.uint8)
    assert np.array_equal(transposed(dense, np.uint8), dense.T)
