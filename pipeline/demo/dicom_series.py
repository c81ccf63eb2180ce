"""Synthetic DICOM CT series: real CT Image Storage files, for demos, tests and benchmarks.

The test patient's name and ID are fixed and recognisable, so a test can search the logs for
them. Slices are written as Explicit VR Little Endian, one file per instance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

TEST_PATIENT_NAME = "DOE^JANE^TESTPATIENT"
TEST_PATIENT_ID = "PID-TEST-0042"


def new_uid() -> UID:
    """A 2.25 UUID-derived UID (PS3.5 B.2): unique without a registered root."""
    return generate_uid(prefix=None)


@dataclass(frozen=True)
class SeriesSpec:
    study_uid: str
    series_uid: str
    slices: int = 20
    rows: int = 64
    cols: int = 64
    spacing_mm: float = 1.0
    thickness_mm: float = 2.0
    series_number: int = 1
    description: str = "SYNTHETIC CT"


def new_series(
    slices: int = 20,
    rows: int = 64,
    cols: int = 64,
    study_uid: str | None = None,
    series_number: int = 1,
) -> SeriesSpec:
    return SeriesSpec(
        study_uid=study_uid or str(new_uid()),
        series_uid=str(new_uid()),
        slices=slices,
        rows=rows,
        cols=cols,
        series_number=series_number,
    )


def ct_slices(spec: SeriesSpec, seed: int = 0) -> Iterator[Dataset]:
    """One dataset per slice: a body ellipse with two lungs, in HU stored with intercept -1024."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : spec.rows, 0 : spec.cols].astype(np.float32)
    cy, cx = spec.rows / 2, spec.cols / 2
    body = ((yy - cy) / (0.40 * spec.rows)) ** 2 + ((xx - cx) / (0.45 * spec.cols)) ** 2 <= 1
    lungs = (
        ((yy - cy) / (0.25 * spec.rows)) ** 2 + ((xx - cx * 0.65) / (0.12 * spec.cols)) ** 2 <= 1
    ) | (((yy - cy) / (0.25 * spec.rows)) ** 2 + ((xx - cx * 1.35) / (0.12 * spec.cols)) ** 2 <= 1)
    hu = np.full((spec.rows, spec.cols), -1000.0, np.float32)
    hu[body] = 40.0
    hu[lungs] = -850.0
    for k in range(spec.slices):
        noisy = hu + rng.normal(0.0, 10.0, hu.shape).astype(np.float32)
        stored = np.clip(noisy + 1024.0, 0, 4095).astype(np.uint16)
        yield _slice(spec, k, stored)


def _slice(spec: SeriesSpec, k: int, pixels: np.ndarray) -> Dataset:
    sop_uid = new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.study_uid + ".1"
    ds.PatientName = TEST_PATIENT_NAME
    ds.PatientID = TEST_PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = "dicom-pipeline synthetic"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = spec.description
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, float(k * spec.thickness_mm)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = spec.thickness_mm
    ds.PixelSpacing = [spec.spacing_mm, spec.spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.PixelData = pixels.tobytes()
    return ds


def write_series(folder: Path, spec: SeriesSpec, seed: int = 0) -> list[Path]:
    """Write the series, one file per slice named by instance number; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in ct_slices(spec, seed):
        path = folder / f"{spec.series_number:03d}_{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_volume_series(
    folder: Path,
    hu: np.ndarray,
    affine_ras: np.ndarray,
    study_uid: str | None = None,
    description: str = "SYNTHETIC CT",
) -> SeriesSpec:
    """Write a volume (X, Y, Z in HU, nibabel's voxel order) with its RAS affine as a CT
    series whose geometry reproduces that affine (PS3.3 C.7.6.2.1.1)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    dc, dr = float(np.linalg.norm(lps[:3, 0])), float(np.linalg.norm(lps[:3, 1]))
    spec = SeriesSpec(
        study_uid=study_uid or str(new_uid()),
        series_uid=str(new_uid()),
        slices=hu.shape[2],
        rows=hu.shape[1],
        cols=hu.shape[0],
        spacing_mm=dc,
        thickness_mm=float(np.linalg.norm(lps[:3, 2])),
        description=description,
    )
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(hu.shape[2]):
        stored = np.clip(np.round(hu[:, :, k].T) + 1024, 0, 4095).astype(np.uint16)
        ds = _slice(spec, k, stored)
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*lps[:3, 0] / dc, *lps[:3, 1] / dr)]
        ds.PixelSpacing = [dr, dc]
        ds.save_as(folder / f"{k + 1:04d}.dcm", enforce_file_format=True)
    return spec
