from __future__ import annotations

from pathlib import Path

import data_store
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from pydicom.pixels.processing import apply_color_lut
from torch.nn import functional

from pipeline.convert import images as convert
from pipeline.core.contract import InputKind, discover_contracts
from pipeline.core.errors import InputError
from pipeline.demo.synthetic import write_ct_nifti, write_mednist_png

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


def test_a_palette_colour_image_is_its_colours_in_grey() -> None:
    """PALETTE COLOR (one sample that indexes colour tables: ultrasound) was refused as an
    impossible pixel description; its stored values are indices, not intensities."""
    path = PYDICOM_FILES / "examples_palette.dcm"
    ds = pydicom.dcmread(path)
    image = convert.load(path)
    assert tuple(image.array.shape) == (1, 350, 800)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float32)
    assert np.allclose(np.asarray(image.array[0]), rgb.mean(axis=-1))
    assert not np.allclose(np.asarray(image.array[0]), ds.pixel_array)


def test_a_vendors_ultrasound_with_segmented_palette_tables_is_its_colours_in_grey() -> None:
    """An ALOKA ultrasound (pydicom-data's real file) whose palette lookup tables are
    segmented, as PS3.3 allows: read through pydicom's palette support, like whole tables."""
    path = Path(data_store.__file__).parent / "data" / "gdcm-US-ALOKA-16.dcm"
    ds = pydicom.dcmread(path)
    assert "SegmentedRedPaletteColorLookupTableData" in ds
    assert "RedPaletteColorLookupTableData" not in ds
    image = convert.load(path)
    assert tuple(image.array.shape) == (1, 480, 640)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float32)
    assert np.allclose(np.asarray(image.array[0]), rgb.mean(axis=-1))
    assert float(image.array.std()) > 0  # an image, not a blank


def test_a_multi_frame_colour_image_is_a_grey_volume_of_its_frames() -> None:
    """Two RGB frames (an ultrasound clip's kind): a volume of two grey frames, as a
    multi-frame grey image is; the colour axis had been left in, a 5-D tensor no model takes."""
    path = PYDICOM_FILES / "SC_rgb_rle_2frame.dcm"
    ds = pydicom.dcmread(path)
    image = convert.load(path)
    assert image.spatial_dims == 3 and tuple(image.array.shape) == (1, 100, 100, 2)
    grey = ds.pixel_array.astype(np.float32).mean(axis=-1)  # (frames, rows, cols)
    assert np.allclose(np.asarray(image.array[0]), np.transpose(grey, (2, 1, 0)))


def test_a_monochrome1_radiograph_is_read_as_monochrome2_shows_it() -> None:
    """MONOCHROME1 (a CR's: the lowest value is white) is inverted, so a 2D model trained on
    images where bone is bright sees bone bright."""
    path = PYDICOM_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "ImagePositionPatient" not in ds
    stored = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = np.asarray(convert.load(path).array[0])
    assert np.allclose(image, stored.max() + stored.min() - stored)
    assert image[stored == stored.min()].min() == image.max()  # the lowest value: brightest


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


@pytest.mark.parametrize("first", ["ct_lesion_segmentation", "ct_covid_classifier"])
def test_models_sharing_their_first_transforms_get_what_they_would_alone(
    tmp_path: Path, first: str
) -> None:
    """The CT route's two models share a reorientation and an intensity window, computed once
    for both: each model still gets exactly its own preprocessing's result, whichever asks
    first, and the segmentation can still bring its mask back to the source geometry."""
    loaded = convert.load(write_ct_nifti(tmp_path / "ct.nii.gz", positive=True, seed=3))
    lps = np.diag([-0.8, -0.8, 2.5, 1.0])  # as a DICOM series comes: Orientation flips it
    image = convert.LoadedImage(InputKind.NIFTI, MetaTensor(loaded.array.as_tensor(), affine=lps))
    cls, seg = CONTRACTS["ct_covid_classifier"], CONTRACTS["ct_lesion_segmentation"]
    prep = convert.Preprocessing(image, [CONTRACTS[first], cls if first != cls.name else seg])
    if first == cls.name:
        x, _ = prep.model_input(cls)
    pre, compose, _ = prep.spatial(seg)
    if first != cls.name:
        x, _ = prep.model_input(cls)
    assert np.array_equal(x, convert.to_model_input(image, cls, convert.preprocessor(cls)))
    alone, _, _ = convert.Preprocessing(image, [seg]).spatial(seg)
    assert torch.equal(pre.as_tensor(), alone.as_tensor())
    assert not np.allclose(np.asarray(pre.affine), lps)  # reoriented to RAS
    back = compose.inverse(pre)
    assert np.allclose(np.asarray(back.affine), lps) and back.shape == image.array.shape


def test_one_segmentations_inversion_leaves_the_shared_steps_to_the_next(tmp_path: Path) -> None:
    """Two segmentation models on the same steps: inverting the first one's result must not
    use up the record of the shared steps that the second one needs to invert its own. A model
    that asks meanwhile without those first steps is preprocessed on its own."""
    loaded = convert.load(write_ct_nifti(tmp_path / "ct.nii.gz", positive=False, seed=4))
    lps = np.diag([-0.8, -0.8, 2.5, 1.0])
    image = convert.LoadedImage(InputKind.NIFTI, MetaTensor(loaded.array.as_tensor(), affine=lps))
    seg = CONTRACTS["ct_lesion_segmentation"]
    other = seg.model_copy(update={"name": "other_segmentation"})
    prep = convert.Preprocessing(image, [seg, other])
    for contract in (seg, other):
        pre, compose, _ = prep.spatial(contract)
        back = compose.inverse(pre)
        assert np.allclose(np.asarray(back.affine), lps) and back.shape == image.array.shape
        if contract is seg:  # and a model that does not begin with those steps gets its own
            cls = CONTRACTS["ct_covid_classifier"]
            unoriented = cls.model_copy(update={"preprocessing": cls.preprocessing[1:]})
            alone = convert.to_model_input(image, unoriented, convert.preprocessor(unoriented))
            assert np.array_equal(prep.model_input(unoriented)[0], alone)


def test_a_ct_is_kept_in_int16_once_its_models_have_their_shared_steps() -> None:
    """Hounsfield units are integers: once every model can go on from the shared steps' result,
    the source is kept in int16 (half the memory, the same values for the previews), and a
    model that asks later without those steps still gets what it would alone."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3000, (1, 60, 50, 40)).astype(np.float32)
    lps = np.diag([-0.8, -0.8, 2.5, 1.0])
    image = convert.LoadedImage(InputKind.DICOM, MetaTensor(torch.from_numpy(hu), affine=lps))
    cls, seg = CONTRACTS["ct_covid_classifier"], CONTRACTS["ct_lesion_segmentation"]
    prep = convert.Preprocessing(image, [cls, seg])
    x, _ = prep.model_input(cls)
    assert prep.image.array.dtype == torch.int16
    assert np.array_equal(np.asarray(prep.image.array), hu)
    assert np.allclose(np.asarray(prep.image.array.affine), lps)
    assert np.array_equal(x, convert.to_model_input(image, cls, convert.preprocessor(cls)))
    pre, _, _ = prep.spatial(seg)
    alone, _, _ = convert.Preprocessing(image, [seg]).spatial(seg)
    assert torch.equal(pre.as_tensor(), alone.as_tensor())
    unoriented = cls.model_copy(update={"preprocessing": cls.preprocessing[1:]})
    later = convert.to_model_input(image, unoriented, convert.preprocessor(unoriented))
    assert np.array_equal(prep.model_input(unoriented)[0], later)
    assert np.array_equal(np.asarray(image.array), hu)  # the caller's image untouched

    fractional = convert.LoadedImage(InputKind.NIFTI, MetaTensor(torch.from_numpy(hu + 0.5)))
    prep = convert.Preprocessing(fractional, [cls, seg])
    prep.model_input(cls)
    assert prep.image.array.dtype == torch.float32  # not integers: kept as they are
