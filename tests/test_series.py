"""Series to volume, against references built independently of pipeline/convert/series.py.

The reference series are written here from a known volume and a known voxel-to-RAS affine in
nibabel's conventions; the DICOM tags are derived from that affine by the standard (PS3.3
C.7.6.2.1.1), so a loader that gets order, orientation, spacing or rescale wrong cannot match.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from pipeline.convert.grouping import group_series
from pipeline.convert.series import load_series
from pipeline.core.errors import InputError

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    out: np.ndarray = rz @ ry @ rx
    return out


def known_affine(
    spacing: tuple[float, float, float], rot: np.ndarray, origin: list[float]
) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def known_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """HU-like values, different in every voxel along every axis (order errors show)."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    values = -1000 + 7 * i + 13 * j + 101 * k + rng.integers(0, 5, shape)
    out: np.ndarray = values.astype(np.float32)
    return out


def slice_datasets(
    volume: np.ndarray, affine_ras: np.ndarray, slope: float = 1.0, intercept: float = -1024.0
) -> list[Dataset]:
    """One CT slice per k, tags derived from the affine (independent of the loader)."""
    lps = LPS @ affine_ras
    dc, dr = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_dir, col_dir = lps[:3, 0] / dc, lps[:3, 1] / dr
    study, series = generate_uid(), generate_uid()
    out = []
    for k in range(volume.shape[2]):
        ds = _base(study, series, CTImageStorage)
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(dr), float(dc)]
        ds.InstanceNumber = volume.shape[2] - k  # misleading on purpose
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((volume[:, :, k].T - intercept) / slope).astype(np.uint16)
        _pixels(ds, stored)
        out.append(ds)
    return out


def _base(study: str, series: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = UID(study), UID(series)
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "TEST^SERIES", "SERIES-1"
    return ds


def _pixels(ds: Dataset, stored: np.ndarray) -> None:
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = stored.astype("<u2").tobytes()


def write(datasets: list[Dataset], folder: Path, shuffle: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(len(datasets)))
    if shuffle:
        random.Random(7).shuffle(order)
    paths = []
    for n, i in enumerate(order):  # file names in an order unrelated to position
        path = folder / f"IM{n:04d}"
        datasets[i].save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_oblique_shuffled_rescaled_series_matches_the_known_volume_and_affine(
    tmp_path: Path,
) -> None:
    volume = known_volume((24, 20, 12))
    affine = known_affine((0.7, 0.9, 2.5), rotation(0.3, -0.2, 0.5), [-80.0, 40.0, 12.5])
    paths = write(slice_datasets(volume, affine, slope=2.0, intercept=-1024.0), tmp_path)
    got = load_series(paths)
    np.testing.assert_allclose(got.affine, affine, atol=1e-4)
    assert got.array.dtype == np.float32 and got.shape == volume.shape
    np.testing.assert_allclose(got.array, np.round(volume / 2) * 2, atol=1e-3)
    assert got.spacing == pytest.approx((0.7, 0.9, 2.5), abs=1e-5) and got.tilt_deg < 1e-3
    # nibabel agrees on where every voxel is: the same data and affine as a NIfTI image
    img = nib.Nifti1Image(np.asarray(got.array), got.affine)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(affine)


def test_gantry_tilt_gives_a_sheared_affine_not_an_error(tmp_path: Path) -> None:
    volume = known_volume((16, 16, 10))
    affine = known_affine((0.8, 0.8, 3.0), np.eye(3), [0.0, 0.0, 0.0])
    tilt = np.radians(12.0)
    affine[1, 2] = 3.0 * np.tan(tilt)  # each plane shifted along y: a tilted gantry
    got = load_series(write(slice_datasets(volume, affine), tmp_path))
    np.testing.assert_allclose(got.affine, affine, atol=1e-4)
    assert got.tilt_deg == pytest.approx(12.0, abs=0.01)


def test_localizer_and_sr_are_skipped_and_reported(tmp_path: Path) -> None:
    volume = known_volume((8, 8, 6))
    datasets = slice_datasets(volume, known_affine((1, 1, 1), np.eye(3), [0, 0, 0]))
    scout = slice_datasets(
        known_volume((8, 8, 1), 3), known_affine((2, 2, 2), rotation(1.2, 0, 0), [5, 5, 5])
    )[0]
    scout.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    sr = _base(
        str(datasets[0].StudyInstanceUID),
        str(datasets[0].SeriesInstanceUID),
        "1.2.840.10008.5.1.4.1.1.88.11",
    )
    paths = write([*datasets, scout, sr], tmp_path)
    got = load_series(paths)
    assert got.shape == volume.shape
    assert sorted(s.reason for s in got.skipped) == ["localizer", "no pixel data (not an image)"]


def test_a_missing_slice_is_a_clear_error(tmp_path: Path) -> None:
    datasets = slice_datasets(
        known_volume((8, 8, 6)), known_affine((1, 1, 2), np.eye(3), [0, 0, 0])
    )
    del datasets[3]
    with pytest.raises(InputError, match="irregular slice spacing"):
        load_series(write(datasets, tmp_path))


def enhanced(singles: list[Dataset], series_uid: str) -> Dataset:
    """One Enhanced CT object holding the slices as frames, stored in the opposite order."""
    ds = _base(str(singles[0].StudyInstanceUID), series_uid, ENHANCED_CT)
    ds.NumberOfFrames = len(singles)
    shared = Dataset()
    orientation, measures, values = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = singles[0].ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = singles[0].PixelSpacing, 1.5
    values.RescaleSlope, values.RescaleIntercept, values.RescaleType = 1, -1024, "HU"
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [values]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = list(reversed(singles))
    per_frame = []
    for s in frames:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = s.ImagePositionPatient
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    shape = (int(singles[0].Rows), int(singles[0].Columns))
    _pixels(ds, np.stack([np.frombuffer(s.PixelData, "<u2").reshape(shape) for s in frames]))
    return ds


def test_multi_frame_enhanced_equals_the_single_frame_series(tmp_path: Path) -> None:
    volume = known_volume((12, 10, 7))
    affine = known_affine((0.6, 0.6, 1.5), rotation(0.1, 0.2, -0.3), [10.0, -20.0, 30.0])
    singles = slice_datasets(volume, affine)
    got = load_series(write([enhanced(singles, generate_uid())], tmp_path / "mf"))
    ref = load_series(write(singles, tmp_path / "sf"))
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(got.array, ref.array)
    np.testing.assert_allclose(got.affine, affine, atol=1e-4)


def test_an_enhanced_series_split_over_several_objects_is_one_volume(tmp_path: Path) -> None:
    volume = known_volume((12, 10, 9))
    affine = known_affine((0.6, 0.6, 1.5), rotation(0.1, 0.2, -0.3), [10.0, -20.0, 30.0])
    singles = slice_datasets(volume, affine)
    uid = generate_uid()
    parts = [enhanced(singles[:3], uid), enhanced(singles[3:], uid)]  # 3 frames, then 6
    got = load_series(write(parts, tmp_path, shuffle=False))
    np.testing.assert_array_equal(got.array, volume)
    np.testing.assert_allclose(got.affine, affine, atol=1e-4)


def test_group_series_lists_files_in_position_order(tmp_path: Path) -> None:
    """load_series puts each plane in place as it reads when the files come in position
    order; in any other order it must give the same volume."""
    volume = known_volume((16, 12, 10))
    affine = known_affine((0.7, 0.7, 2.0), rotation(0.2, -0.1, 0.3), [5.0, 5.0, -40.0])
    shuffled = write(slice_datasets(volume, affine), tmp_path)
    [group], skipped = group_series(shuffled)
    assert not skipped and sorted(group.paths) == sorted(shuffled)
    in_order, as_named = load_series(group.paths), load_series(shuffled)
    by_position = [uid for uid, _ in in_order.slices]
    listed = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in group.paths]
    assert listed == by_position
    np.testing.assert_array_equal(in_order.array, volume)
    np.testing.assert_array_equal(as_named.array, volume)
    np.testing.assert_allclose(in_order.affine, as_named.affine)


def test_planes_of_different_sizes_are_a_clear_error(tmp_path: Path) -> None:
    datasets = slice_datasets(
        known_volume((8, 8, 6)), known_affine((1, 1, 2), np.eye(3), [0, 0, 0])
    )
    odd = slice_datasets(known_volume((8, 10, 1)), known_affine((1, 1, 2), np.eye(3), [0, 0, 6]))
    odd[0].SeriesInstanceUID = datasets[0].SeriesInstanceUID
    with pytest.raises(InputError, match="planes of different sizes"):
        load_series(write([*datasets, *odd], tmp_path, shuffle=False))


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000", "jpeg-ls"])
def test_compressed_series_decode_to_the_same_volume(tmp_path: Path, syntax: str) -> None:
    volume = known_volume((64, 48, 5))  # JPEG 2000 needs room for its resolution levels
    affine = known_affine((1.0, 1.0, 2.0), rotation(0, 0, 0.4), [0, 0, 0])
    plain = write(slice_datasets(volume, affine), tmp_path / "plain")
    compressed = tmp_path / syntax
    compressed.mkdir()
    for path in plain:
        out = compressed / path.name
        if syntax == "jpeg-ls":
            if shutil.which("dcmcjpls") is None:
                pytest.skip("dcmtk's dcmcjpls is not installed")
            subprocess.run(["dcmcjpls", str(path), str(out)], check=True)
        else:
            ds = dcmread(path)
            ds.compress(RLELossless if syntax == "rle" else JPEG2000Lossless)
            ds.save_as(out)
    got = load_series(sorted(compressed.iterdir()))
    ref = load_series(plain)
    np.testing.assert_array_equal(got.array, ref.array)
    np.testing.assert_allclose(got.affine, ref.affine)


def test_agrees_with_monai_pydicom_reader_on_every_voxel(tmp_path: Path) -> None:
    """MONAI's own DICOM reader, a second independent implementation: each voxel of ours is
    at the same world position, with the same value, as the matching voxel of MONAI's."""
    from monai.transforms import LoadImage

    volume = known_volume((20, 16, 9))
    affine = known_affine((0.8, 0.8, 2.0), np.eye(3), [-10.0, 20.0, -30.0])
    paths = write(slice_datasets(volume, affine), tmp_path)
    ours = load_series(paths)
    theirs = LoadImage(reader="PydicomReader", image_only=True)(str(tmp_path))
    mapping = np.linalg.inv(np.asarray(theirs.affine, dtype=np.float64)) @ ours.affine
    rounded = np.round(mapping)
    np.testing.assert_allclose(mapping, rounded, atol=1e-4)  # voxel grids coincide
    idx = np.indices(ours.shape).reshape(3, -1)
    mapped = (rounded[:3, :3] @ idx + rounded[:3, 3:4]).astype(int)
    their_array = np.asarray(theirs)
    np.testing.assert_allclose(their_array[tuple(mapped)], ours.array[tuple(idx)], atol=1e-3)
