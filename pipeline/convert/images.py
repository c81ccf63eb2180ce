"""Convert stage: an input file becomes a float32 tensor that satisfies a model's contract.

Loading is by kind (PNG/JPEG with Pillow, NIfTI with nibabel, a single DICOM file with
pydicom); preprocessing is the contract's list of MONAI transforms. Every failure is an
``InputError`` whose message says what was wrong with the file, without its name: file names
may carry patient names, and these messages are logged.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from PIL import Image
from pydicom.pixels.processing import apply_color_lut, apply_rescale
from pydicom.uid import MediaStorageDirectoryStorage

from pipeline.core.contract import MAX_VOXELS as MAX_VOXELS
from pipeline.core.contract import InputKind, ModelContract, TransformSpec
from pipeline.core.errors import InputError
from pipeline.core.filekinds import detect_kind

# The transforms a contract may name. An allow-list, not getattr on monai: contracts are data.
TRANSFORMS: dict[str, Callable[..., Any]] = {
    "ScaleIntensity": mt.ScaleIntensity,
    "ScaleIntensityRange": mt.ScaleIntensityRange,
    "NormalizeIntensity": mt.NormalizeIntensity,
    "CropForeground": mt.CropForeground,
    "Resize": mt.Resize,
    "Orientation": mt.Orientation,
    "Spacing": mt.Spacing,
    "SpatialPad": mt.SpatialPad,
    "CenterSpatialCrop": mt.CenterSpatialCrop,
}


@dataclass(frozen=True)
class LoadedImage:
    kind: InputKind
    array: MetaTensor  # channel first: (1, H, W) or (1, X, Y, Z)

    @property
    def spatial_dims(self) -> int:
        return int(self.array.ndim) - 1


class NotAnImageError(InputError):
    """A readable DICOM object that holds no image (a DICOMDIR, an SR): an error where a file
    was dropped to be processed, a file to pass over where a folder is looked through."""


def load(path: Path) -> LoadedImage:
    kind = detect_kind(path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)")
    loader = {
        InputKind.IMAGE: _load_image,
        InputKind.NIFTI: _load_nifti,
        InputKind.DICOM: _load_dicom,
    }
    array = loader[kind](path)
    if array.numel() > MAX_VOXELS:
        raise InputError(f"{array.shape} is larger than {MAX_VOXELS} voxels")
    if array.numel() == 0:
        raise InputError(f"an empty image (shape {tuple(array.shape[1:])})")
    return LoadedImage(kind, array)


def voxels_in(path: Path) -> tuple[int, ...]:
    """The size of the image a file holds, from its header alone (no pixel data read): a
    NIfTI's shape, a DICOM object's frames, rows and columns; () where that is not known
    before loading (a PNG or JPEG, a file that cannot be read: :func:`load` says why)."""
    try:
        kind = detect_kind(path)
        if kind is InputKind.NIFTI:
            return tuple(int(n) for n in nib.load(path).shape)
        if kind is InputKind.DICOM:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return (int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))
    except Exception:  # noqa: BLE001 (see _PARSER_ERRORS): load() says why, not this
        return ()
    return ()


# _PARSER_ERRORS: the loaders catch every Exception that Pillow, nibabel and pydicom raise
# while parsing, because on malformed files they raise far more than their documented types
# (the fuzz tests found TypeError, OverflowError, KeyError, HeaderDataError, numpy's
# DTypePromotionError and pydicom's BytesLengthException). Each means the same to a user: this
# file cannot be read. The message keeps the library's words and the exception's type.


def _reason(exc: BaseException, path: Path) -> str:
    """The library's message with the file's path and name taken out."""
    text = str(exc).replace(str(path), "<file>").replace(path.name, "<file>")
    return f"{type(exc).__name__}: {text}"


def _load_image(path: Path) -> MetaTensor:
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            pixels = np.array(img.convert("F"), dtype=np.float32)  # grayscale, 8 or 16 bit
    except Exception as exc:  # see _PARSER_ERRORS
        raise InputError(f"not a readable PNG/JPEG image ({_reason(exc, path)})") from exc
    return MetaTensor(pixels[np.newaxis])


def _load_nifti(path: Path) -> MetaTensor:
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        if int(np.prod(shape)) > MAX_VOXELS:
            raise InputError(f"{shape} is larger than {MAX_VOXELS} voxels")
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except InputError:
        raise
    except Exception as exc:  # see _PARSER_ERRORS
        raise InputError(f"not a readable NIfTI file ({_reason(exc, path)})") from exc
    if not np.isfinite(img.affine).all():
        raise InputError("the NIfTI header's geometry (pixdim, affine) is not finite")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"expected a 3D NIfTI volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError("volume holds NaN or infinite values")
    return MetaTensor(data[np.newaxis], affine=img.affine)


def _load_dicom(path: Path) -> MetaTensor:
    try:
        ds = pydicom.dcmread(path)
        if ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
            raise NotAnImageError(
                "a DICOMDIR, the index of a DICOM medium, holds no image: the image files it "
                "lists are taken by themselves"
            )
        if "PixelData" not in ds:
            raise NotAnImageError(
                f"DICOM object without pixel data (SOP class {ds.get('SOPClassUID', 'unknown')})"
            )
        check_pixel_description(ds)
        photometric = str(ds.get("PhotometricInterpretation", ""))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if photometric == "PALETTE COLOR":  # the stored values index colours
                pixels = apply_color_lut(ds.pixel_array, ds).astype(np.float32)
            else:
                pixels = apply_rescale(ds.pixel_array, ds).astype(np.float32)
        if photometric == "MONOCHROME1":  # the lowest value is white: as MONOCHROME2 shows it
            pixels = pixels.max() + pixels.min() - pixels
        if not np.isfinite(pixels).all():
            raise InputError("pixel values are not finite (check RescaleSlope/Intercept)")
    except InputError:
        raise
    except Exception as exc:  # see _PARSER_ERRORS
        raise InputError(f"not a readable DICOM image ({_reason(exc, path)})") from exc
    colour = ds.get("SamplesPerPixel", 1) > 1 or photometric == "PALETTE COLOR"
    if colour and pixels.ndim in (3, 4) and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)  # one frame or several: colours last
    if pixels.ndim == 3:  # multi-frame: (frames, rows, cols) -> (cols, rows, frames) like NIfTI
        pixels = np.transpose(pixels, (2, 1, 0))
    return MetaTensor(pixels[np.newaxis])


_PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_RCT",
    "YBR_ICT",
    "PALETTE COLOR",
}


def check_pixel_description(
    ds: pydicom.Dataset, get: Callable[[str, Any], Any] | None = None
) -> None:
    """The Image Pixel module must describe the pixel data it comes with (PS3.3 C.7.6.3):
    pydicom would otherwise decode a mismatch into a wrong image, or crash. ``get(keyword,
    default)`` reads a value (a series passes its memo of converted values)."""
    get = get or ds.get
    rows, cols = int(get("Rows", 0) or 0), int(get("Columns", 0) or 0)
    frames = int(get("NumberOfFrames", 1) if "NumberOfFrames" in ds else 1)
    samples = int(get("SamplesPerPixel", 1))
    allocated = int(get("BitsAllocated", 0) or 0)
    stored = int(get("BitsStored", allocated) or 0)
    high = int(get("HighBit", stored - 1))
    photometric = str(get("PhotometricInterpretation", ""))
    if min(rows, cols, frames) < 1:
        raise InputError(f"no pixels: {frames} frame(s) of {rows}x{cols}")
    if rows * cols * frames > MAX_VOXELS:
        raise InputError(f"{frames}x{rows}x{cols} is too large")
    if samples not in (1, 3) or allocated not in (1, 8, 16, 32) or not 0 < stored <= allocated:
        raise InputError(
            f"unsupported pixel description: {samples} sample(s), {allocated} bits allocated, "
            f"{stored} stored"
        )
    if high != stored - 1 or int(get("PixelRepresentation", 0)) not in (0, 1):
        raise InputError("inconsistent pixel description (HighBit, PixelRepresentation)")
    one_sample = photometric.startswith("MONO") or photometric == "PALETTE COLOR"
    if photometric not in _PHOTOMETRIC or (samples == 1) != one_sample:
        raise InputError(f"photometric interpretation {photometric!r} with {samples} sample(s)")
    # The tables may be whole or segmented (PS3.3 C.7.9.2); pydicom applies either.
    tables = ("RedPaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData")
    if photometric == "PALETTE COLOR" and not any(t in ds for t in tables):
        raise InputError("PALETTE COLOR without its lookup tables")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and not syntax.is_compressed:
        expected = (rows * cols * frames * samples * allocated + 7) // 8
        raw = ds.get_item("PixelData").value  # the raw bytes: no conversion; None if empty
        actual = len(raw or b"")
        if actual not in (expected, expected + 1):  # one byte of padding to an even length
            raise InputError(
                f"pixel data is {actual} bytes, the header declares {expected} "
                f"({frames}x{rows}x{cols}, {samples} sample(s), {allocated} bits)"
            )


def transforms(contract: ModelContract, specs: Sequence[TransformSpec]) -> list[Any]:
    """The MONAI transforms that ``specs`` (some of the contract's) name."""
    steps = []
    for spec in specs:
        try:
            steps.append(TRANSFORMS[spec.name](**spec.args))
        except KeyError:
            raise ValueError(
                f"{contract.name}: transform {spec.name!r} is not allowed; "
                f"choose from {sorted(TRANSFORMS)}"
            ) from None
    return steps


def preprocessor(contract: ModelContract) -> mt.Compose:
    steps = transforms(contract, contract.preprocessing)
    return mt.Compose([*steps, mt.EnsureType(data_type="numpy", dtype=np.float32)])


def to_model_input(image: LoadedImage, contract: ModelContract, compose: mt.Compose) -> np.ndarray:
    """The contract's preprocessing applied; the result has exactly the contract's shape."""
    _check_dims(image, contract)
    return _checked_input(_apply(compose, image.array, contract), contract)


class Preprocessing:
    """The preprocessing of one image for several models. The leading transforms that all
    the models share (the same names and arguments, as for models trained on one
    normalisation) run once, for the first model that asks; the others go on from their
    result (held until every model has had its input). On a 200-slice CT the two demo models
    share a reorientation and an intensity window: a tenth of a second saved per series."""

    def __init__(self, image: LoadedImage, contracts: Sequence[ModelContract]) -> None:
        self.image = image
        self._waiting = {c.name for c in contracts}
        specs = [c.preprocessing for c in contracts]
        self._specs = specs
        shared = 0
        if len(specs) > 1:
            while all(len(s) > shared and s[shared] == specs[0][shared] for s in specs):
                shared += 1
        self._shared = specs[0][:shared] if shared else ()
        self._base: tuple[MetaTensor, list[Any]] | None = None  # once computed
        self._ready: dict[str, tuple[np.ndarray, float]] = {}  # made ahead by prepare()

    def spatial(self, contract: ModelContract) -> tuple[MetaTensor, mt.Compose, float]:
        """The contract's transforms applied (a MetaTensor that records them), the Compose
        that inverts them, and the milliseconds this call took."""
        _check_dims(self.image, contract)
        t0 = time.perf_counter()
        shares = bool(self._shared) and contract.preprocessing[: len(self._shared)] == self._shared
        if shares and self._base is None:
            steps = transforms(contract, self._shared)
            self._base = (_apply(mt.Compose(steps), self.image.array, contract), steps)
            if all(c[: len(self._shared)] == self._shared for c in self._specs):
                # Every model goes on from the base: the source's voxels are left for the
                # previews, which show them in 8 bits; in int16 where that is exact (CT).
                self.image = LoadedImage(self.image.kind, compact(self.image.array))
        start, done = self._base if shares and self._base else (_float(self.image.array), [])
        own = transforms(contract, contract.preprocessing[len(done) :])
        data = _apply(mt.Compose(own), _fresh(start), contract) if own else _fresh(start)
        self._waiting.discard(contract.name)
        if not self._waiting:
            self._base = None
        return data, mt.Compose([*done, *own]), (time.perf_counter() - t0) * 1000.0

    def prepare(self, contracts: Sequence[ModelContract]) -> None:
        """Make the fixed-shape inputs of ``contracts`` (classifiers: small) now, for
        :meth:`model_input` to hand out later: a segmentation left last is then the base's
        only user, and the base goes with its whole-volume work instead of outliving it."""
        for contract in contracts:
            self._ready[contract.name] = self.model_input(contract)

    def model_input(self, contract: ModelContract) -> tuple[np.ndarray, float]:
        """The contract's preprocessing applied, with the contract's exact shape; and the
        milliseconds it took."""
        if contract.name in self._ready:
            return self._ready.pop(contract.name)
        data, _, ms = self.spatial(contract)
        t0 = time.perf_counter()
        out = _checked_input(data.as_tensor(), contract)
        return out, ms + (time.perf_counter() - t0) * 1000.0


def compact(array: MetaTensor) -> MetaTensor:
    """``array`` in int16 (half the memory) where each voxel is an integer in int16's range,
    as CT's Hounsfield units are; else ``array`` itself. Converted a slab at a time."""
    data = array.as_tensor()
    if data.dtype != torch.float32 or data.ndim < 2:
        return array
    out = torch.empty(data.shape, dtype=torch.int16)
    for planes in _slabs(data):
        slab, small = data[:, planes], out[:, planes]
        small.copy_(slab.clamp(-32768, 32767))
        if not torch.equal(small.to(torch.float32), slab):
            return array
    return MetaTensor(out, meta=dict(array.meta), applied_operations=[])


def _float(array: MetaTensor) -> MetaTensor:
    """A compacted source (:func:`compact`) in float32 again, for a model that did not say it
    would come (MONAI's intensity transforms keep an integer input's type)."""
    if array.dtype == torch.float32:
        return array
    return MetaTensor(array.as_tensor().float(), meta=dict(array.meta), applied_operations=[])


def _fresh(data: MetaTensor) -> MetaTensor:
    """``data``'s voxels (not copied) with a metadata and transform record of its own: the
    next model's transforms, or a segmentation's inversion, must not change the shared one."""
    return MetaTensor(
        data.as_tensor(), meta=dict(data.meta), applied_operations=list(data.applied_operations)
    )


def _check_dims(image: LoadedImage, contract: ModelContract) -> None:
    if image.spatial_dims != contract.spatial_dims:
        raise InputError(
            f"{contract.name} takes {contract.spatial_dims}D inputs, "
            f"got {image.spatial_dims}D {tuple(image.array.shape[1:])}"
        )


# Transforms that set each voxel from its own value alone (fixed bounds, no statistics of the
# image): run a slab at a time in place, the same values without a whole-volume temporary per
# arithmetic step (four volumes at once for ScaleIntensityRange on a 600-slice CT, two so).
_VOXELWISE = (mt.ScaleIntensityRange,)
_SLAB_VOXELS = 1 << 22  # 16 MB of float32 per slab


def _apply(compose: mt.Compose, data: Any, contract: ModelContract) -> Any:
    """``compose``'s transforms applied to ``data`` in turn, each voxelwise one in place on
    a tensor of its own (never on ``data``'s voxels: the input, or a base shared by models)."""
    given = _storage(data)
    try:
        for step in compose.transforms:
            if isinstance(step, _VOXELWISE) and _float_tensor(data):
                if _storage(data) == given:
                    data = data.clone()
                _in_place_by_slab(step, data)
            else:
                data = step(data)
    except RuntimeError as exc:  # MONAI names the failing transform in the message
        raise InputError(f"preprocessing for {contract.name} failed: {exc}") from exc
    return data


def _storage(data: Any) -> int | None:
    return data.untyped_storage().data_ptr() if isinstance(data, torch.Tensor) else None


def _float_tensor(data: Any) -> bool:
    return isinstance(data, torch.Tensor) and data.dtype == torch.float32 and data.ndim >= 2


def _in_place_by_slab(step: Any, data: torch.Tensor) -> None:
    """``step`` on ``data`` (channel first) a slab at a time, written back."""
    for planes in _slabs(data):
        slab = data[:, planes]
        slab.copy_(torch.as_tensor(step(slab)))


def _slabs(data: torch.Tensor) -> Iterator[slice]:
    """Slabs of ``data``'s first spatial axis (channel first) of about _SLAB_VOXELS each:
    whole rows of memory where ``data`` is contiguous."""
    width = max(1, _SLAB_VOXELS // max(1, data[:, 0].numel()))
    for first in range(0, data.shape[1], width):
        yield slice(first, first + width)


def _checked_input(data: Any, contract: ModelContract) -> np.ndarray:
    out = np.asarray(data, dtype=np.float32)
    if tuple(out.shape) != contract.input.shape:
        raise InputError(
            f"preprocessing for {contract.name} gave shape {out.shape}, "
            f"the model takes {contract.input.shape}"
        )
    if not np.isfinite(out).all():
        raise InputError(f"preprocessing for {contract.name} produced NaN values (blank image?)")
    return out
