"""DICOM header values as the series loader reads them: each distinct raw value converted once,
and which objects carry pixel data but are no image to infer on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pipeline.core.errors import InputError

# SOP classes that carry pixel data but are not images of the patient to infer on.
NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT dose",
}


def float_values(value: Any, n: int, what: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InputError(f"{what} is missing or malformed")
    return out


class HeaderValues:
    """Element values of one series' files, each distinct raw value converted once.

    Most elements (orientation, spacing, sizes, rescale, classes) are the same in every slice,
    and pydicom's conversion of a value costs more than reading it; this keeps the read close
    to a raw read. Positions are parsed straight from their bytes."""

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], Any] = {}

    def get(self, ds: Dataset, keyword: str, default: Any = None) -> Any:
        tag = tag_for_keyword(keyword)
        elem = ds.get_item(tag) if tag is not None else None
        if tag is None or elem is None:
            return default
        raw = elem.value
        if not isinstance(raw, bytes):  # converted already
            return raw
        key = (tag, raw, ds.original_encoding)
        if key not in self._memo:
            self._memo[key] = ds[tag].value
        return self._memo[key]

    def floats(self, ds: Dataset, keyword: str, n: int) -> np.ndarray:
        tag = tag_for_keyword(keyword)
        elem = ds.get_item(tag) if tag is not None else None
        raw = elem.value if elem is not None else None
        if isinstance(raw, bytes):  # a decimal string: "x\\y\\z", ASCII in any syntax
            try:
                return float_values(raw.split(b"\\"), n, keyword)
            except InputError:
                pass  # odd bytes: let pydicom say what they are
        return float_values(ds.get(keyword), n, keyword)


# No pixel data where they belong: a broken file, not an object to leave aside.
IMAGE_WITHOUT_PIXELS = "no pixel data in an image, or in an object of no known SOP class"


def skip_reason(ds: Dataset, values: HeaderValues) -> str | None:
    if "PixelData" not in ds:
        if _known_non_image(values.get(ds, "SOPClassUID", "")):
            return "no pixel data (not an image)"  # a report, a presentation state, ...
        return IMAGE_WITHOUT_PIXELS
    if reason := NOT_IMAGES.get(str(values.get(ds, "SOPClassUID", ""))):
        return reason
    image_type = [str(v).upper() for v in values.get(ds, "ImageType", None) or []]
    if "LOCALIZER" in image_type:
        return "localizer"
    return None


def _known_non_image(sop_class: object) -> bool:
    """Whether the SOP class is a known one of objects that are no images (SR, presentation
    states, key object selections, encapsulated documents), by pydicom's dictionary of UIDs
    (whose names say "Image" for every image class)."""
    uid = UID(str(sop_class or ""))
    return uid.name != uid and "Image" not in uid.name  # an unknown UID's name is itself


@dataclass(frozen=True)
class Skipped:
    """A file left out of a series, and why (no image, a localizer, unreadable). ``broken``:
    a file that cannot be what it says (unreadable, or an image without pixels), as against
    one that is fine but no image to infer on."""

    name: str
    reason: str
    broken: bool = False
    modality: str = ""
    sop_class: str = ""
