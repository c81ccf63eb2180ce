"""Preview PNGs: decodable, the answer in the caption area, the mask where the lesion is."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.outputs.preview import CAPTION_PX, classification_preview, segmentation_preview


def test_classification_preview_shows_the_image_the_right_way_up() -> None:
    image = np.zeros((1, 64, 48), np.float32)  # (channel, rows, columns) as loaded from a PNG
    image[0, :8, :] = 1.0  # a bright band along the top
    png = Image.open(io.BytesIO(classification_preview(image, "Hand", 0.97))).convert("L")
    body = np.asarray(png)[CAPTION_PX:]
    assert png.width < png.height  # not transposed: taller than wide, like the input
    assert body[: body.shape[0] // 8].mean() > 200 and body[body.shape[0] // 2 :].mean() < 10
    assert np.asarray(png)[:CAPTION_PX].max() > 0  # the caption was drawn


def test_segmentation_preview_shows_the_slice_with_the_most_lesion() -> None:
    hu = np.full((1, 40, 30, 12), -1000.0, np.float32)
    mask = np.zeros((40, 30, 12), np.uint8)
    mask[10:20, 5:15, 3] = 1  # small on slice 3
    mask[20:36, 10:26, 8] = 1  # largest on slice 8
    hu[0][mask > 0] = 40.0
    rgb = np.asarray(
        Image.open(io.BytesIO(segmentation_preview(hu, mask, "2 lesion(s)"))).convert("RGB")
    )[CAPTION_PX:]
    red = rgb[..., 0].astype(int) - rgb[..., 1] > 80  # the overlay: red well above green
    scale = rgb.shape[1] / 40  # columns of the display are the volume's first index
    expected = 16 * 16 * scale * scale
    assert abs(red.sum() - expected) < 0.15 * expected  # slice 8's lesion, not slice 3's
    rows, cols = np.nonzero(red)
    assert abs(cols.mean() / scale - 28) < 1.5 and abs(rows.mean() / scale - 18) < 1.5
