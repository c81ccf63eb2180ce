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
:func:`~pipeline.convert.grouping.group_series` lists a series' files in position order, so the
planes land where they belong and need no reordering.
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
from pydicom.dataset import Dataset

from pipeline.convert.headers import (
    IMAGE_WITHOUT_PIXELS,
    HeaderValues,
    Skipped,
    float_values,
    skip_reason,
)
from pipeline.convert.images import MAX_VOXELS, check_pixel_description
from pipeline.core.errors import InputError

# Relative tolerance on the spacing between planes, and on their direction.
SPACING_TOLERANCE = 0.01
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


def _planes(ds: Dataset, values: HeaderValues) -> list[_Plane]:
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
                float_values(position[0].get("ImagePositionPatient"), 3, "ImagePositionPatient"),
                float_values(
                    orient[0].get("ImageOrientationPatient"), 6, "ImageOrientationPatient"
                ),
                tuple(float_values(measures[0].get("PixelSpacing"), 2, "PixelSpacing")),
                float(vt.get("RescaleSlope", 1) or 1),
                float(vt.get("RescaleIntercept", 0) or 0),
            )
        )
    if len(planes) != frames:
        raise InputError(f"{len(planes)} per-frame groups for {frames} frames")
    return planes


def _raw_dtype(ds: Dataset, values: HeaderValues) -> np.dtype[Any] | None:
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


def _pixels(plane: _Plane, cache: dict[int, np.ndarray], values: HeaderValues) -> np.ndarray:
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

    def __init__(self, files: int, values: HeaderValues) -> None:
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
    values = HeaderValues()
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
    paths: list[Path], values: HeaderValues, filler: _Filler
) -> tuple[list[_Plane], list[Skipped], str, str]:
    """Each file's planes, handed to the filler as they come; and what was skipped, why."""
    planes: list[_Plane] = []
    skipped: list[Skipped] = []
    series_uid = modality = ""
    for path in paths:
        try:
            ds = dcmread(path)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed files
            why = f"not readable DICOM: {type(exc).__name__}: {exc}"
            skipped.append(Skipped(path.name, why, broken=True))
            continue
        try:
            if reason := skip_reason(ds, values):
                skipped.append(Skipped(path.name, reason, reason == IMAGE_WITHOUT_PIXELS))
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
    values: HeaderValues,
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
