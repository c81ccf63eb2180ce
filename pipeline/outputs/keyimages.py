"""Key images: what a reader sees of a result in any viewer, drawn into the pixels.

A segmentation's key image is the source slice where a lesion is widest (the slice its KOS
flags), at the source's own size and window, each lesion on it outlined and labelled with its
number and volume; a classification's is the image (the middle slice of a volume) with the
label and the probabilities. A banner across the top says what made it and, for demo weights,
that it is not for diagnostic use. The pixels are the source's: row and column of a key image
are row and column of its source slice, so an outline is where the lesion is."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage

from pipeline.core.contract import ModelContract
from pipeline.core.results import Result

OUTLINE = (255, 48, 48)  # red: no CT or MR gray has it, so a reader (and a test) can find it
LABEL = (255, 255, 0)
BANNER_TEXT = (255, 255, 255)
DEMO_TEXT = (255, 176, 0)


@dataclass(frozen=True)
class KeyView:
    """One key image: the source plane it shows and its RGB pixels (rows, columns, 3)."""

    plane: int  # index of the source slice in the volume (its last axis)
    rgb: np.ndarray
    title: str  # what it shows, for the series and the report


def png(view: KeyView) -> bytes:
    """A key image as PNG, for the preview and the status page."""
    out = io.BytesIO()
    Image.fromarray(view.rgb, "RGB").save(out, format="PNG")
    return out.getvalue()


def volumes_ml(result: Result) -> list[float]:
    """Each lesion's volume, by lesion number less one (largest first, as in result.json)."""
    lesions = result.segmentation.lesions if result.segmentation else []
    return [lesion.volume_ml for lesion in lesions]


def banner(contract: ModelContract, result: Result, demo: bool) -> list[str]:
    """The banner's lines: the model that made the image and how to read it."""
    made = f"AI result: {contract.name} v{result.model.version or '1'} (dicom-pipeline)"
    if demo:
        return [made, "DEMO WEIGHTS - NOT FOR DIAGNOSTIC USE"]
    return [made, "For review with the original images"]


def window(header: Dataset | None, contract: ModelContract) -> tuple[float, float] | None:
    """(centre, width) to show a slice with: the source's own window, else the one the model
    reads its input through (its ScaleIntensityRange), else None (the image's range)."""
    if header is not None and "WindowCenter" in header and "WindowWidth" in header:
        centre, width = _first(header.WindowCenter), _first(header.WindowWidth)
        if width > 1.0:
            return centre, width
    return model_window(contract)


def model_window(contract: ModelContract) -> tuple[float, float] | None:
    """The intensity window of the model's input, from its ScaleIntensityRange."""
    for step in contract.preprocessing:
        if step.name.rstrip("d") == "ScaleIntensityRange":
            lo, hi = float(step.args["a_min"]), float(step.args["a_max"])
            if hi > lo:
                return (lo + hi) / 2.0, hi - lo
    return None


def _first(value: object) -> float:
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)  # type: ignore[arg-type]


def source_plane(array: np.ndarray, plane: int | None) -> np.ndarray:
    """(rows, columns) of the source slice ``plane`` of a channel-first volume (column, row,
    plane), or of a 2D image as loaded (already rows, columns)."""
    data: np.ndarray = np.asarray(array)[0]
    if data.ndim == 2:
        return data
    k = data.shape[2] // 2 if plane is None else plane
    return np.ascontiguousarray(data[:, :, k].T)


def gray(values: np.ndarray, shown: tuple[float, float] | None, inverted: bool) -> np.ndarray:
    """8-bit display values through a (centre, width) window; MONOCHROME1 inverted."""
    values = values.astype(np.float32)
    if shown is None:
        lo, hi = float(values.min()), float(values.max())
    else:
        lo, hi = shown[0] - shown[1] / 2.0, shown[0] + shown[1] / 2.0
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    out = (scaled * 255.0 + 0.5).astype(np.uint8)
    return 255 - out if inverted else out


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2D mask on its border, thickened inwards on larger images."""
    width = 2 if max(mask.shape) >= 256 else 1
    border: np.ndarray = mask & ~ndimage.binary_erosion(mask, iterations=width)
    return border


def _text_size(rows: int) -> int:
    return max(9, rows // 36)


def _font(rows: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=_text_size(rows))


def _banner_font(
    img: Image.Image, lines: list[str]
) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The body text's size, smaller where a line would not fit the image's width."""
    size = _text_size(img.height)
    while True:
        font = ImageFont.load_default(size=size)
        if size <= 7 or all(font.getlength(line) <= img.width - 8 for line in lines):
            return font
        size -= 1


def _draw_banner(img: Image.Image, lines: list[str], demo: bool) -> None:
    """White (and for demo weights amber) text on a black band over the top rows."""
    font = _banner_font(img, lines)
    draw = ImageDraw.Draw(img)
    step = int(font.size * 1.25) if isinstance(font, ImageFont.FreeTypeFont) else 12
    draw.rectangle((0, 0, img.width, step * len(lines) + 4), fill=(0, 0, 0))
    for i, line in enumerate(lines):
        colour = DEMO_TEXT if demo and i == len(lines) - 1 else BANNER_TEXT
        draw.text((4, 2 + i * step), line, fill=colour, font=font)


def lesion_view(
    plane_values: np.ndarray,
    shown: tuple[float, float] | None,
    inverted: bool,
    labels_on_plane: np.ndarray,
    volumes_ml: list[float],
    lines: list[str],
    demo: bool,
) -> np.ndarray:
    """RGB of one slice: every lesion that crosses it outlined, its number and volume beside
    it (``labels_on_plane``: (rows, columns) lesion numbers, 1-based as in result.json)."""
    rgb = np.repeat(gray(plane_values, shown, inverted)[..., np.newaxis], 3, axis=2)
    numbers = [int(n) for n in np.unique(labels_on_plane) if n > 0]
    for n in numbers:
        rgb[outline(labels_on_plane == n)] = OUTLINE
    img = Image.fromarray(rgb, "RGB")
    draw, font = ImageDraw.Draw(img), _font(img.height)
    for n in numbers:
        rows, cols = np.nonzero(labels_on_plane == n)
        x = min(int(cols.max()) + 3, img.width - 1)
        y = max(int(rows.min()), 0)
        draw.text((x, y), f"{n}: {volumes_ml[n - 1]:.2f} ml", fill=LABEL, font=font)
    _draw_banner(img, lines, demo)
    return np.asarray(img)


def classification_view(
    plane_values: np.ndarray,
    shown: tuple[float, float] | None,
    inverted: bool,
    result: Result,
    lines: list[str],
    demo: bool,
) -> np.ndarray:
    """RGB of the image with the answer: the label and each label's probability."""
    img = Image.fromarray(gray(plane_values, shown, inverted), "L").convert("RGB")
    draw, font = ImageDraw.Draw(img), _font(img.height)
    size = font.size if isinstance(font, ImageFont.FreeTypeFont) else 10
    answer = [f"{result.prediction.label}"] + [
        f"{name}: {p:.3f}" for name, p in result.prediction.probabilities.items()
    ]
    top = img.height - int(size * 1.25) * len(answer) - 4
    for i, line in enumerate(answer):
        draw.text((4, top + i * int(size * 1.25)), line, fill=LABEL, font=font)
    _draw_banner(img, lines, demo)
    return np.asarray(img)
