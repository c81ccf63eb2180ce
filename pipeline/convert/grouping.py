"""DICOM files grouped into their series, images only, the rest reported with a reason; each
series with the header facts routing looks at (read without pixel data)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from pipeline.convert.headers import IMAGE_WITHOUT_PIXELS, HeaderValues, Skipped, skip_reason
from pipeline.core.errors import InputError
from pipeline.core.routing import SeriesFacts


@dataclass
class SeriesGroup:
    """One series' files and the header facts routing looks at (read without pixel data)."""

    uid: str
    paths: list[Path]
    modality: str
    body_part: str
    description: str
    sop_class: str
    planes: int
    rows: int = 0
    cols: int = 0
    frames: int = 1  # the most frames in any one object
    volume: bool = False  # planes at distinct positions in the patient (see group_series)

    def facts(self, calling_aet: str = "", called_aet: str = "") -> SeriesFacts:
        """What routing rules look at, with the AE titles the study came with."""
        return SeriesFacts(
            kind="dicom",
            slices=self.planes,
            frames=self.frames,
            volume=self.volume,
            modality=self.modality,
            body_part=self.body_part,
            series_description=self.description,
            sop_class_uid=self.sop_class,
            calling_aet=calling_aet,
            called_aet=called_aet,
        )


def _position(ds: Dataset, values: HeaderValues) -> float | None:
    """A single-frame image's position along its slice normal, if its header has one."""
    try:  # values.floats says InputError for a missing or malformed value alike
        orient = values.floats(ds, "ImageOrientationPatient", 6)
        return float(
            values.floats(ds, "ImagePositionPatient", 3) @ np.cross(orient[:3], orient[3:])
        )
    except InputError:
        return None


def group_series(paths: Iterable[Path]) -> tuple[list[SeriesGroup], list[Skipped]]:
    """Files grouped by SeriesInstanceUID, images only; the rest reported with a reason.

    A series' files are listed in position order where every file has a position (single-frame
    images): :func:`~pipeline.convert.series.load_series` then puts each plane in place as it
    reads it. The order is only a hint for speed; load_series checks and orders the planes
    itself."""
    groups: dict[str, SeriesGroup] = {}
    positions: dict[str, list[float | None]] = {}
    enhanced: dict[str, list[bool]] = {}
    skipped: list[Skipped] = []
    values = HeaderValues()
    seen: set[str] = set()
    for path in sorted(paths):
        try:
            # Large values (the pixel data) are deferred: seen as present, never read here.
            ds = dcmread(path, defer_size=4096)
            sop = str(ds.get("SOPInstanceUID", ""))
            uid = str(ds.get("SeriesInstanceUID", ""))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed files
            why = f"not readable DICOM: {type(exc).__name__}: {exc}"
            skipped.append(Skipped(path.name, why, broken=True))
            continue
        reason = "a second copy of an instance" if sop and sop in seen else None
        seen.add(sop)
        broken = False
        try:
            reason = reason or skip_reason(ds, values)
            broken = reason == IMAGE_WITHOUT_PIXELS
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            group = groups.get(uid) or SeriesGroup(
                uid=uid,
                paths=[],
                modality=str(ds.get("Modality", "")),
                body_part=str(ds.get("BodyPartExamined", "")),
                description=str(ds.get("SeriesDescription", "")),
                sop_class=str(ds.get("SOPClassUID", "")),
                planes=0,
                rows=int(ds.get("Rows", 0) or 0),
                cols=int(ds.get("Columns", 0) or 0),
            )
        except Exception as exc:  # noqa: BLE001 - values their VR allows but we cannot use
            reason, broken = f"unusable header: {type(exc).__name__}: {exc}", True
        if reason is not None:
            modality, sop_class = _text(ds, "Modality"), _text(ds, "SOPClassUID")
            skipped.append(Skipped(path.name, reason, broken, modality, sop_class))
            continue
        groups[uid] = group
        group.paths.append(path)
        group.planes += frames
        group.frames = max(group.frames, frames)
        positions.setdefault(uid, []).append(_position(ds, values) if frames == 1 else None)
        enhanced.setdefault(uid, []).append(frames > 1 and "PerFrameFunctionalGroupsSequence" in ds)
    for uid, group in groups.items():
        keys = [k for k in positions[uid] if k is not None]
        group.volume = _volume(group, positions[uid], enhanced[uid])
        if len(keys) == len(group.paths):
            ranked = sorted(range(len(keys)), key=keys.__getitem__)
            group.paths = [group.paths[i] for i in ranked]
    return list(groups.values()), skipped


def _volume(group: SeriesGroup, positions: list[float | None], enhanced: list[bool]) -> bool:
    """A stack of planes: more than one, each object placed in the patient (a single-frame
    image with a position, an enhanced multi-frame object with its frames'), at more than one
    position. Radiograph views and captures have none; two images at one place are no stack."""
    if group.planes < 2:
        return False
    if not all(p is not None or e for p, e in zip(positions, enhanced, strict=True)):
        return False
    return any(enhanced) or len({round(p, 2) for p in positions if p is not None}) > 1


def _text(ds: Dataset, keyword: str) -> str:
    """A value for a record, or "" where the header cannot give it."""
    try:
        return str(ds.get(keyword, ""))
    except Exception:  # noqa: BLE001 - a value its VR allows but pydicom cannot convert
        return ""
