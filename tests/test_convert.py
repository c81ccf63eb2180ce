from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from torch.nn import functional

from pipeline import convert
from pipeline.contract import InputKind, discover_contracts
from pipeline.demo.synthetic import write_ct_nifti, write_mednist_png
from pipeline.errors import InputError

from .conftest import MODEL_REPOSITORY

CONTRACTS = discover_contracts(MODEL_REPOSITORY)
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _model_input(path: Path, model: str) -> np.ndarray:
    c = CONTRACTS[model]
    return convert.to_model_input(convert.load(path), c, convert.preprocessor(c))


def test_png_becomes_the_mednist_contract_tensor(tmp_path: Path) -> None:
    x = _model_input(write_mednist_png(tmp_path / "a.png", "Hand", 1), "mednist_classifier")
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0  # ScaleIntensity


def test_nifti_is_windowed_cropped_and_resized_like_the_seed(tmp_path: Path) -> None:
    path = write_ct_nifti(tmp_path / "ct.nii.gz", positive=True, seed=3)
    image = convert.load(path)
    assert image.kind is InputKind.NIFTI and image.spatial_dims == 3
    assert np.allclose(np.diag(np.asarray(image.array.affine))[:3], [0.8, 0.8, 2.5])
    x = _model_input(path, "ct_covid_classifier")
    assert x.shape == (1, 192, 192, 64)
    # Independent reference of the seed's chain: window, box of voxels > 0 widened by a margin
    # of 5 (zero-padded where it passes the edge, as MONAI 1.6 does), area resize.
    hu = np.asarray(nib.load(path).get_fdata(), dtype=np.float32)
    w = np.pad(np.clip((hu + 1000.0) / 1500.0, 0.0, 1.0), 5)
    nz = np.nonzero(w > 0)
    box = tuple(slice(int(a.min()) - 5, int(a.max()) + 6) for a in nz)
    crop = torch.from_numpy(w[box].copy())
    ref = functional.interpolate(crop[None, None], size=(192, 192, 64), mode="area")[0].numpy()
    assert np.allclose(x, ref, atol=1e-5)


def test_single_dicom_file_is_rescaled_to_hounsfield(tmp_path: Path) -> None:
    path = PYDICOM_FILES / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    image = convert.load(path)
    assert image.kind is InputKind.DICOM and tuple(image.array.shape) == (1, 128, 128)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(np.asarray(image.array[0]), expected)
    assert _model_input(path, "mednist_classifier").shape == (1, 64, 64)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.png", b"this is text, not an image", "not a readable PNG/JPEG"),
        ("empty.nii.gz", b"", "empty file"),
        ("report.pdf", b"%PDF-1.4", "unsupported file type"),
        ("header.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00", "DICOM object without pixel data"),
        ("cut.dcm", (PYDICOM_FILES / "CT_small.dcm").read_bytes()[:20000], "pixel data is 13700"),
    ],
)
def test_bad_files_give_clear_errors_without_their_names(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        convert.load(path)
    assert name not in str(info.value)  # file names may carry patient names; messages are logged


def test_truncated_nifti_is_an_input_error(tmp_path: Path) -> None:
    good = write_ct_nifti(tmp_path / "good.nii.gz", positive=False, seed=1).read_bytes()
    bad = tmp_path / "DOE_JOHN.nii.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="not a readable NIfTI") as info:
        convert.load(bad)
    assert "DOE_JOHN" not in str(info.value)


def test_wrong_dimensionality_is_refused(tmp_path: Path) -> None:
    image = convert.load(write_mednist_png(tmp_path / "a.png", "CXR", 2))
    c = CONTRACTS["ct_covid_classifier"]
    with pytest.raises(InputError, match="takes 3D inputs"):
        convert.to_model_input(image, c, convert.preprocessor(c))
