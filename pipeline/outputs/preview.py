"""Preview PNGs: people look before they read.

A classification's preview is the input (the middle slice of a volume) with its label and
probability; a segmentation's is the slice where the mask is largest, the mask overlaid in red,
with the lesion count and volume; a series taken image by image shows its images side by side,
each with its own answer. Slices are shown as a radiologist expects for an axial DICOM
series: the volume's first index runs left to right, its second top to bottom. CT intensities
use a lung window when the values look like Hounsfield units, else the input's own range.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

CAPTION_PX = 22
MAX_SIDE = 512
TILE_SIDE = 256  # each image of a series taken image by image
MAX_TILES = 12  # in rows of 4; the caption says how many more there are


def _gray(plane: np.ndarray) -> np.ndarray:
    """8-bit display values: a lung window (-1000..200 HU) for CT-like data, else min..max."""
    plane = plane.astype(np.float32)
    lo, hi = float(np.min(plane)), float(np.max(plane))
    if lo < -500.0 and hi > 0.0:  # Hounsfield units
        lo, hi = -1000.0, 200.0
    scaled = (plane - lo) / (hi - lo) if hi > lo else np.zeros_like(plane)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _plane(array: np.ndarray, k: int | None) -> np.ndarray:
    """(rows, columns) for display from a channel-first 2D or 3D array."""
    data = np.asarray(array)[0]
    if data.ndim == 2:  # an image as loaded: already (rows, columns)
        return np.asarray(data)
    data = data[:, :, data.shape[2] // 2 if k is None else k]
    return np.ascontiguousarray(data.T)


def _png(rgb: np.ndarray, caption: str) -> bytes:
    img = Image.fromarray(rgb, "RGB")
    # Small inputs are enlarged so the caption fits, large ones reduced to MAX_SIDE.
    scale = min(MAX_SIDE, max(256, max(img.size))) / max(img.size)
    if scale != 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (img.width, img.height + CAPTION_PX), (0, 0, 0))
    canvas.paste(img, (0, CAPTION_PX))
    ImageDraw.Draw(canvas).text((4, 4), caption, fill=(255, 255, 0))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def classification_preview(array: np.ndarray, label: str, probability: float) -> bytes:
    gray = _gray(_plane(array, None))
    return _png(np.stack([gray] * 3, axis=-1), f"{label}  p={probability:.3f}")


def segmentation_preview(array: np.ndarray, mask: np.ndarray, caption: str) -> bytes:
    """``array`` channel-first (1, X, Y, Z); ``mask`` (X, Y, Z) on the same voxels."""
    areas = mask.reshape(-1, mask.shape[-1]).sum(axis=0) if mask.ndim == 3 else None
    k = int(np.argmax(areas)) if areas is not None and areas.max() > 0 else None
    gray = _gray(_plane(array, k)).astype(np.float32)
    overlay = _plane(mask[np.newaxis], k) > 0
    rgb = np.stack([gray] * 3, axis=-1)
    rgb[overlay] = 0.5 * rgb[overlay] + 0.5 * np.array([255.0, 0.0, 0.0])
    return _png(rgb.astype(np.uint8), caption)


def thumbnail(array: np.ndarray) -> np.ndarray:
    """An image (channel-first 2D, as loaded) as 8-bit gray at most TILE_SIDE on a side: what
    the preview of a series keeps of each image once the image itself is dropped."""
    img = Image.fromarray(_gray(_plane(array, None)), "L")
    img.thumbnail((TILE_SIDE, TILE_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(img)


def images_preview(tiles: list[tuple[np.ndarray, str]]) -> bytes:
    """Thumbnails (:func:`thumbnail`) side by side, in rows of four, each with its caption."""
    shown = tiles[:MAX_TILES]
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    step = TILE_SIDE + CAPTION_PX
    canvas = Image.new("RGB", (columns * TILE_SIDE, rows * step + CAPTION_PX), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    more = f"  (+{len(tiles) - len(shown)} more)" if len(tiles) > len(shown) else ""
    draw.text((4, 4), f"{len(tiles)} images{more}", fill=(255, 255, 255))
    for i, (gray, caption) in enumerate(shown):
        x, y = (i % columns) * TILE_SIDE, CAPTION_PX + (i // columns) * step
        draw.text((x + 4, y + 4), caption, fill=(255, 255, 0))
        canvas.paste(Image.fromarray(gray, "L").convert("RGB"), (x, y + CAPTION_PX))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
