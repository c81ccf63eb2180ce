"""A DICOM series becomes a volume with its geometry: what the models and MONAI need.

Each file is read once. Slices are ordered by their position along the slice normal (never by
InstanceNumber or file name); RescaleSlope/Intercept are applied per slice (they may differ);
multi-frame (enhanced) objects give one plane per frame. Localizers and objects that are not
images (SR, PR, KO, SEG, ...) are skipped and reported. Spacing between planes must be uniform:
gaps (missing slices) are an error that says so. Gantry tilt needs no resampling here: the
affine's third column is the measured step between planes, so a tilted series gets a sheared
affine that MONAI's Spacing/Orientation transforms resample correctly.

The volume is float32, indexed (column, row, plane), with a RAS affine (nibabel and MONAI
conventions: DICOM's LPS with x and y negated). Uncompressed pixel data is read with
``np.frombuffer`` straight into the volume; compressed data goes through pydicom's decoders.
Each plane is converted into the volume as soon as its file is read (:class:`_Filler`);
:func:`group_series` lists a series' files in position order, so the planes land where they
belong and need no reordering.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from pipeline.convert.images import MAX_VOXELS, check_pixel_description
from pipeline.core.errors import InputError
from pipeline.core.routing import SeriesFacts

# Relative tolerance on the spacing between planes, and on their direction.
SPACING_TOLERANCE = 0.01
# SOP classes that carry pixel data but are not images of the patient to infer on.
_NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT dose",
}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def numpy_huge_pages(enabled: bool) -> bool:
    """Whether numpy advises the kernel to back large arrays with transparent huge pages
    (numpy's default on Linux); returns the previous choice. Under the kernels' usual
    ``defrag=madvise`` a fresh allocation so advised may stall in memory compaction; on the
    2-core VM reading a 500-slice series varied more and took longer with the advice (see
    ``pipeline.bench.convert``). The worker turns it off (``worker.numpy_huge_pages``)."""
    # The switch behind numpy's NUMPY_MADVISE_HUGEPAGE, which numpy reads only at import.
    # numpy 1.x's module path (the project pins numpy < 2, see pyproject.toml).
    from numpy.core import multiarray

    return bool(multiarray._set_madvise_hugepage(enabled))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass
class Volume:
    """``array`` is (columns, rows, planes) float32; ``affine`` maps voxel indices to RAS mm."""

    array: np.ndarray
    affine: np.ndarray
    series_uid: str
    modality: str
    spacing: tuple[float, float, float]
    tilt_deg: float
    skipped: list[Skipped] = field(default_factory=list)
    # Where each plane came from, in plane order: (SOP Instance UID, 0-based frame or None for
    # a single-frame object); and the source headers by SOP Instance UID, pixel data dropped.
    # DICOM SEG and SR reference the source instances through these.
    slices: list[tuple[str, int | None]] = field(default_factory=list)
    headers: dict[str, Dataset] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)


@dataclass
class _Plane:
    ds: Dataset
    frame: int | None  # None: a single-frame object
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InputError(f"{what} is missing or malformed")
    return out


class _Values:
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
                return _floats(raw.split(b"\\"), n, keyword)
            except InputError:
                pass  # odd bytes: let pydicom say what they are
        return _floats(ds.get(keyword), n, keyword)


def _skip_reason(ds: Dataset, values: _Values) -> str | None:
    if "PixelData" not in ds:
        return "no pixel data (not an image)"
    if reason := _NOT_IMAGES.get(str(values.get(ds, "SOPClassUID", ""))):
        return reason
    image_type = [str(v).upper() for v in values.get(ds, "ImageType", None) or []]
    if "LOCALIZER" in image_type:
        return "localizer"
    return None


def _planes(ds: Dataset, values: _Values) -> list[_Plane]:
    frames = int(values.get(ds, "NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if frames != 1:
            raise InputError("a multi-frame object without per-frame positions")
        return [
            _Plane(
                ds,
                None,
                values.floats(ds, "ImagePositionPatient", 3),
                values.floats(ds, "ImageOrientationPatient", 6),
                tuple(values.floats(ds, "PixelSpacing", 2)),
                float(values.get(ds, "RescaleSlope", 1) or 1),
                float(values.get(ds, "RescaleIntercept", 0) or 0),
            )
        ]
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    planes = []
    for i, per_frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        # Each functional group is per frame or shared by all frames.
        position = per_frame.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        orient = per_frame.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence")
        measures = per_frame.get("PixelMeasuresSequence") or shared.get("PixelMeasuresSequence")
        transform = per_frame.get("PixelValueTransformationSequence") or shared.get(
            "PixelValueTransformationSequence"
        )
        if not position or not orient or not measures:
            raise InputError(f"frame {i + 1} has no plane position, orientation or spacing")
        vt = transform[0] if transform else Dataset()
        planes.append(
            _Plane(
                ds,
                i,
                _floats(position[0].get("ImagePositionPatient"), 3, "ImagePositionPatient"),
                _floats(orient[0].get("ImageOrientationPatient"), 6, "ImageOrientationPatient"),
                tuple(_floats(measures[0].get("PixelSpacing"), 2, "PixelSpacing")),
                float(vt.get("RescaleSlope", 1) or 1),
                float(vt.get("RescaleIntercept", 0) or 0),
            )
        )
    if len(planes) != frames:
        raise InputError(f"{len(planes)} per-frame groups for {frames} frames")
    return planes


def _raw_dtype(ds: Dataset, values: _Values) -> np.dtype[Any] | None:
    """The dtype to read uncompressed pixel data without decoding, or None to decode."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or ts.is_compressed or int(values.get(ds, "SamplesPerPixel", 1)) != 1:
        return None
    bits = int(values.get(ds, "BitsAllocated", 0))
    stored = int(values.get(ds, "BitsStored", bits))
    signed = int(values.get(ds, "PixelRepresentation", 0)) == 1
    if bits not in (8, 16, 32) or (signed and stored != bits):
        return None  # sign extension of packed values: leave it to pydicom
    kind = "i" if signed else "u"
    order = "<" if ts.is_little_endian else ">"
    return np.dtype(f"{order}{kind}{bits // 8}")


def _pixels(plane: _Plane, cache: dict[int, np.ndarray], values: _Values) -> np.ndarray:
    ds = plane.ds
    rows, cols = int(values.get(ds, "Rows")), int(values.get(ds, "Columns"))
    dtype = _raw_dtype(ds, values)
    if dtype is not None:
        frame = plane.frame or 0
        n = rows * cols
        return np.frombuffer(
            ds.PixelData, dtype, count=n, offset=frame * n * dtype.itemsize
        ).reshape(rows, cols)
    key = id(ds)
    if key not in cache:
        try:
            cache[key] = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; all mean "cannot"
            raise InputError(f"pixel data cannot be decoded: {exc}") from None
    arr = cache[key]
    return arr[plane.frame] if plane.frame is not None else arr


def _fill(dst: np.ndarray, pixels: np.ndarray, slope: float, intercept: float) -> None:
    """Stored values to float32 with the rescale: one pass over the plane when the slope is 1."""
    if slope != 1.0:
        np.multiply(pixels, np.float32(slope), out=dst, dtype=np.float32)
        if intercept != 0.0:
            dst += np.float32(intercept)
    else:
        np.add(pixels, np.float32(intercept), out=dst, dtype=np.float32)


class _Filler:
    """Converts each plane into the volume as soon as its file is read, in read order, and
    drops the file's pixel data: the next file's bytes can reuse the same memory, and the
    series' pixels are never held twice. Sized by the first file (one
    plane per file given, or that file's frames), grown if more planes come. (A second thread
    converting while the next files were read was slower on 2 cores: the GIL went back and
    forth between the two.)"""

    def __init__(self, files: int, values: _Values) -> None:
        self.files = files
        self.zyx = np.empty((0, 0, 0), dtype=np.float32)
        self.count = 0
        self._values = values

    def add(self, ds: Dataset, planes: Sequence[_Plane]) -> None:
        rows, cols = int(self._values.get(ds, "Rows")), int(self._values.get(ds, "Columns"))
        if self.count == 0:
            expected = self.files if planes[0].frame is None else len(planes)
            self.zyx = np.empty(
                (min(expected, MAX_VOXELS // (rows * cols)), rows, cols), np.float32
            )
        elif (rows, cols) != self.zyx.shape[1:]:
            raise InputError("planes of different sizes in one series")
        if self.count + len(planes) > len(self.zyx):
            self._grow(self.count + len(planes))
        decoded: dict[int, np.ndarray] = {}  # a compressed object, decoded once for its frames
        for plane in planes:
            pixels = _pixels(plane, decoded, self._values)
            _fill(self.zyx[self.count], pixels, plane.slope, plane.intercept)
            self.count += 1
        del ds.PixelData  # the volume holds the pixels now; the header stays for SEG and SR

    def _grow(self, needed: int) -> None:
        rows, cols = self.zyx.shape[1:]
        if needed * rows * cols > MAX_VOXELS:
            raise InputError(f"{needed}x{rows}x{cols} is larger than {MAX_VOXELS} voxels")
        bigger = np.empty(
            (min(max(needed, 2 * len(self.zyx)), MAX_VOXELS // (rows * cols)), rows, cols),
            np.float32,
        )
        bigger[: self.count] = self.zyx[: self.count]
        self.zyx = bigger

    def volume(self, order: Sequence[int]) -> np.ndarray:
        """The planes in ``order`` (indices in read order)."""
        zyx = self.zyx[: self.count]
        if list(order) != list(range(self.count)):
            zyx = zyx[np.asarray(order)]  # files not in position order: one copy
        return zyx


@contextmanager
def _collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a series is read. Each file's headers stay
    alive (SEG and SR reference them), and the collector would walk all of them again and
    again as they pile up: a third of a 500-file read went to it. Reading makes no cycles that
    need collecting soon; the collector runs again afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_series(paths: Iterable[Path]) -> Volume:
    """Read the files of one series (in any order; fastest in position order, as
    :func:`group_series` lists them) into a Volume; InputError says why not."""
    paths = list(paths)
    values = _Values()
    filler = _Filler(len(paths), values)
    with _collection_paused():
        planes, skipped, series_uid, modality = _read(paths, values, filler)
        try:
            return _assemble(planes, series_uid, modality, skipped, values, filler)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a value its VR allows but we cannot use
            why = f"{type(exc).__name__}: {exc}"
            raise InputError(f"the series' geometry or pixels: {why}") from None


def _read(
    paths: list[Path], values: _Values, filler: _Filler
) -> tuple[list[_Plane], list[Skipped], str, str]:
    """Each file's planes, handed to the filler as they come; and what was skipped, why."""
    planes: list[_Plane] = []
    skipped: list[Skipped] = []
    series_uid = modality = ""
    for path in paths:
        try:
            ds = dcmread(path)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed files
            skipped.append(Skipped(path.name, f"not readable DICOM: {type(exc).__name__}: {exc}"))
            continue
        try:
            if reason := _skip_reason(ds, values):
                skipped.append(Skipped(path.name, reason))
                continue
            uid = str(values.get(ds, "SeriesInstanceUID", ""))
            if series_uid and uid != series_uid:
                raise InputError("files of more than one series given as one")
            series_uid, modality = uid, str(values.get(ds, "Modality", ""))
            check_pixel_description(ds, partial(values.get, ds))  # memoised values
            if str(values.get(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR":
                raise InputError(
                    "PALETTE COLOR images are converted one at a time, not as a volume"
                )
            new = _planes(ds, values)
            filler.add(ds, new)
            planes.extend(new)
        except InputError as exc:
            raise InputError(f"instance {path.stem}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a value its VR allows but we cannot use
            raise InputError(f"instance {path.stem}: {type(exc).__name__}: {exc}") from None
    if not planes:
        raise InputError("no image in the series")
    return planes, skipped, series_uid, modality


def _assemble(
    planes: Sequence[_Plane],
    series_uid: str,
    modality: str,
    skipped: list[Skipped],
    values: _Values,
    filler: _Filler,
) -> Volume:
    first = planes[0]
    orient = first.orientation
    # One vectorised check per property (np.allclose per plane costs more than reading it).
    if not np.allclose([p.orientation for p in planes], orient, atol=1e-4):
        raise InputError("planes with different orientations in one series")
    if not np.allclose([p.pixel_spacing for p in planes], first.pixel_spacing, rtol=1e-4):
        raise InputError("planes with different pixel spacing in one series")
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    order = sorted(range(len(planes)), key=lambda i: float(planes[i].position @ normal))
    ordered = [planes[i] for i in order]
    step, tilt = _step(ordered, normal)

    # (plane, row, column) in memory: each slice is one contiguous write.
    zyx = filler.volume(order)
    headers: dict[str, Dataset] = {}
    slices: list[tuple[str, int | None]] = []
    for plane in ordered:
        uid = str(values.get(plane.ds, "SOPInstanceUID", ""))
        headers[uid] = plane.ds
        slices.append((uid, plane.frame))

    dr, dc = first.pixel_spacing  # PS3.3: row spacing (between rows), column spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc  # along a row: the column index grows
    lps[:3, 1] = col_dir * dr  # down a column: the row index grows
    lps[:3, 2] = step
    lps[:3, 3] = ordered[0].position
    return Volume(
        array=zyx.transpose(2, 1, 0),  # (column, row, plane), a view: no copy
        affine=_LPS_TO_RAS @ lps,
        series_uid=series_uid,
        modality=modality,
        spacing=(float(dc), float(dr), float(np.linalg.norm(step))),
        tilt_deg=tilt,
        skipped=skipped,
        slices=slices,
        headers=headers,
    )


def _step(ordered: Sequence[_Plane], normal: np.ndarray) -> tuple[np.ndarray, float]:
    """The vector from one plane to the next, checked uniform; and the gantry tilt."""
    if len(ordered) == 1:
        thickness = float(ordered[0].ds.get("SliceThickness", 1.0) or 1.0)
        return normal * thickness, 0.0
    positions = np.array([p.position for p in ordered])
    diffs = np.diff(positions, axis=0)
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)
    size = float(np.linalg.norm(step))
    if size == 0.0:
        raise InputError("all planes at the same position (duplicate slices?)")
    deviation = np.linalg.norm(diffs - step, axis=1).max() / size
    if deviation > SPACING_TOLERANCE:
        gaps = np.linalg.norm(diffs, axis=1)
        raise InputError(
            f"irregular slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm): missing "
            "slices or a series of several stacks; not resampled"
        )
    cos = abs(float(step @ normal)) / size
    tilt = float(np.degrees(np.arccos(min(1.0, cos))))
    return step, tilt


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

    def facts(self, calling_aet: str = "", called_aet: str = "") -> SeriesFacts:
        """What routing rules look at, with the AE titles the study came with."""
        return SeriesFacts(
            kind="dicom",
            slices=self.planes,
            modality=self.modality,
            body_part=self.body_part,
            series_description=self.description,
            sop_class_uid=self.sop_class,
            calling_aet=calling_aet,
            called_aet=called_aet,
        )


def _position(ds: Dataset, values: _Values) -> float | None:
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
    images): :func:`load_series` then puts each plane in place as it reads it. The order is only
    a hint for speed; load_series checks and orders the planes itself."""
    groups: dict[str, SeriesGroup] = {}
    positions: dict[str, list[float | None]] = {}
    skipped: list[Skipped] = []
    values = _Values()
    seen: set[str] = set()
    for path in sorted(paths):
        try:
            # Large values (the pixel data) are deferred: seen as present, never read here.
            ds = dcmread(path, defer_size=4096)
            sop = str(ds.get("SOPInstanceUID", ""))
            uid = str(ds.get("SeriesInstanceUID", ""))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed files
            skipped.append(Skipped(path.name, f"not readable DICOM: {type(exc).__name__}: {exc}"))
            continue
        reason = "a second copy of an instance" if sop and sop in seen else None
        seen.add(sop)
        try:
            reason = reason or _skip_reason(ds, values)
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
            reason = f"unusable header: {type(exc).__name__}: {exc}"
        if reason is not None:
            skipped.append(Skipped(path.name, reason))
            continue
        groups[uid] = group
        group.paths.append(path)
        group.planes += frames
        positions.setdefault(uid, []).append(_position(ds, values) if frames == 1 else None)
    for uid, group in groups.items():
        keys = [k for k in positions[uid] if k is not None]
        if len(keys) == len(group.paths):
            ranked = sorted(range(len(keys)), key=keys.__getitem__)
            group.paths = [group.paths[i] for i in ranked]
    return list(groups.values()), skipped
