"""A corpus of bad inputs, generated: broken DICOM, NIfTI and images, empty files, unsupported
types and archives, files whose names are odd. Each case is (name, bytes); every one must end
in data/failed/ with a clear error while the services keep running."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from collections.abc import Callable, Iterator

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from pipeline.demo.dicom_series import ct_slices, new_series

Case = tuple[str, bytes]


def _encode(ds: Dataset, preamble: bool = True) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


def good_slice() -> Dataset:
    return next(ct_slices(new_series(slices=1, rows=32, cols=32)))


def good_nifti() -> bytes:
    img = nib.Nifti1Image(np.zeros((24, 24, 12), np.float32), np.eye(4))
    return bytes(img.to_bytes())


def good_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _cuts(data: bytes, n: int) -> list[int]:
    """n cut points, denser in the header."""
    head = [1, 10, 64, 127, 128, 131, 132, 140, 200, 300]
    rest = np.linspace(400, len(data) - 1, max(0, n - len(head))).astype(int).tolist()
    return sorted({c for c in head + rest if 0 < c < len(data)})[:n]


def _edited(edit: Callable[[Dataset], None], preamble: bool = True) -> bytes:
    ds = good_slice()
    edit(ds)
    return _encode(ds, preamble)


def dicom_cases() -> Iterator[Case]:
    rng = np.random.default_rng(7)
    good = _encode(good_slice())
    for cut in _cuts(good, 40):
        yield f"truncated-at-{cut}.dcm", good[:cut]
    for i in range(20):
        yield f"garbage-{i}.dcm", rng.bytes(int(rng.integers(1, 5000)))
    for i in range(10):  # the DICM magic, then garbage
        yield (
            f"garbage-after-magic-{i}.dcm",
            bytes(128) + b"DICM" + rng.bytes(int(rng.integers(8, 3000))),
        )
    yield "no-preamble.dcm", _edited(lambda ds: None, preamble=False)

    def drop_pixels(ds: Dataset) -> None:
        del ds.PixelData

    yield "no-pixel-data.dcm", _edited(drop_pixels)
    for delta in (-2048, -1000, -100, -2, 2, 100, 2048, 4096):

        def resize(ds: Dataset, delta: int = delta) -> None:
            data = bytes(ds.PixelData)
            ds.PixelData = data[:delta] if delta < 0 else data + bytes(delta)

        yield f"pixel-data-{'short' if delta < 0 else 'long'}-by-{abs(delta)}.dcm", _edited(resize)
    absurd: dict[str, dict[str, object]] = {
        "rows-0": {"Rows": 0},
        "columns-0": {"Columns": 0},
        "rows-65535-columns-65535": {"Rows": 65535, "Columns": 65535},
        "frames-1000000": {"NumberOfFrames": 1000000},
        "frames-0": {"NumberOfFrames": 0},
        "bits-allocated-0": {"BitsAllocated": 0},
        "bits-allocated-3": {"BitsAllocated": 3},
        "bits-allocated-7": {"BitsAllocated": 7},
        "bits-allocated-64": {"BitsAllocated": 64},
        "bits-allocated-128": {"BitsAllocated": 128},
        "bits-stored-over-allocated": {"BitsStored": 32},
        "high-bit-40": {"HighBit": 40},
        "samples-per-pixel-0": {"SamplesPerPixel": 0},
        "samples-per-pixel-2": {"SamplesPerPixel": 2},
        "samples-per-pixel-5": {"SamplesPerPixel": 5},
        "samples-3-on-mono-data": {"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"},
        "pixel-representation-2": {"PixelRepresentation": 2},
        "photometric-nonsense": {"PhotometricInterpretation": "NONSENSE"},
        "photometric-palette-without-lut": {"PhotometricInterpretation": "PALETTE COLOR"},
        "rows-1-columns-huge": {"Rows": 1, "Columns": 60000},
        "rescale-slope-nan": {"RescaleSlope": "NaN"},
        "rescale-slope-inf": {"RescaleSlope": "inf"},
    }
    for name, values in absurd.items():

        def put(ds: Dataset, values: dict[str, object] = values) -> None:
            for keyword, value in values.items():
                setattr(ds, keyword, value)

        yield f"absurd-{name}.dcm", _edited(put)
    syntaxes = {
        "jpeg-baseline": JPEGBaseline8Bit,
        "jpeg2000": JPEG2000Lossless,
        "rle": RLELossless,
        "unknown-1.2.3.4": "1.2.3.4",
        "empty": "",
    }
    for name, uid in syntaxes.items():
        data = bytearray(good)
        # The meta header's transfer syntax replaced in place (padded to its length): the data
        # set is still explicit little endian, uncompressed.
        old = str(good_slice_ts(good)).encode()
        new = str(uid).encode()[: len(old)].ljust(len(old), b"\0")
        start = data.index(old)
        data[start : start + len(old)] = new
        yield f"wrong-transfer-syntax-{name}.dcm", bytes(data)
    for name, uid in {"big-endian": ExplicitVRBigEndian}.items():
        data = bytearray(good)
        old = str(good_slice_ts(good)).encode()
        new = str(uid).encode().ljust(len(old), b"\0")
        if len(new) == len(old):
            start = data.index(old)
            data[start : start + len(old)] = new
            yield f"wrong-transfer-syntax-{name}.dcm", bytes(data)


def good_slice_ts(data: bytes) -> str:
    from pydicom import dcmread

    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _nifti_with(**header: object) -> bytes:
    data = bytearray(good_nifti())
    offsets = {"sizeof_hdr": (0, "<i"), "datatype": (70, "<h"), "bitpix": (72, "<h"),
               "vox_offset": (108, "<f"), "magic": (344, "4s")}  # fmt: skip
    for key, value in header.items():
        if key.startswith("dim"):  # dim0 .. dim7 at 40 + 2 i
            struct.pack_into("<h", data, 40 + 2 * int(key[3:]), int(value))  # type: ignore[call-overload]
        elif key.startswith("pixdim"):
            struct.pack_into("<f", data, 76 + 4 * int(key[6:]), float(value))  # type: ignore[arg-type]
        else:
            offset, fmt = offsets[key]
            struct.pack_into(fmt, data, offset, value)
    return bytes(data)


def nifti_cases() -> Iterator[Case]:
    rng = np.random.default_rng(11)
    good = good_nifti()
    for cut in (1, 40, 100, 200, 347, 348, 352, 400, 1000, len(good) - 1):
        yield f"truncated-at-{cut}.nii", good[:cut]
    packed = gzip.compress(good)
    for cut in (1, 10, 50, len(packed) // 2, len(packed) - 20):
        yield f"truncated-gzip-at-{cut}.nii.gz", packed[:cut]
    for i in range(12):
        yield f"garbage-{i}.nii", rng.bytes(int(rng.integers(1, 4000)))
    for i in range(4):
        yield f"garbage-{i}.nii.gz", rng.bytes(int(rng.integers(1, 4000)))
        yield f"gzip-of-garbage-{i}.nii.gz", gzip.compress(rng.bytes(int(rng.integers(1, 4000))))
    headers: dict[str, dict[str, object]] = {
        "magic-wrong": {"magic": b"xxx\0"},
        "dim0-0": {"dim0": 0},
        "dim0-9": {"dim0": 9},
        "dim0-negative": {"dim0": -3},
        "dim-negative": {"dim1": -24},
        "dim-zero": {"dim2": 0},
        "dims-huge": {"dim1": 32767, "dim2": 32767, "dim3": 32767},
        "datatype-999": {"datatype": 999},
        "datatype-complex": {"datatype": 32, "bitpix": 64},
        "datatype-rgb": {"datatype": 128, "bitpix": 24},
        "vox-offset-past-end": {"vox_offset": 1e9},
        "vox-offset-negative": {"vox_offset": -100.0},
        "dim0-2": {"dim0": 2},
        "dim0-5": {"dim0": 5, "dim4": 2, "dim5": 2},
        "dim0-4-t2": {"dim0": 4, "dim4": 2},
    }
    for name, values in headers.items():
        yield f"header-{name}.nii", _nifti_with(**values)
    nan = np.zeros((8, 8, 8), np.float32)
    nan[2, 2, 2] = np.nan
    yield "holds-nan.nii", bytes(nib.Nifti1Image(nan, np.eye(4)).to_bytes())
    yield (
        "two-dimensional.nii",
        bytes(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)).to_bytes()),
    )


def image_cases() -> Iterator[Case]:
    rng = np.random.default_rng(13)
    png = good_png()
    for cut in (1, 8, 16, 33, 40, 50, 60, len(png) // 2):
        yield f"truncated-at-{cut}.png", png[:cut]
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64), np.uint8)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    for cut in (1, 2, 20, len(jpeg) // 2, len(jpeg) - 2):
        yield f"truncated-at-{cut}.jpg", jpeg[:cut]
    for i in range(5):
        yield f"garbage-{i}.png", rng.bytes(int(rng.integers(1, 3000)))
    for i in range(3):
        yield f"garbage-{i}.jpg", rng.bytes(int(rng.integers(1, 3000)))
    yield "text-named.png", b"not an image at all\n"
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # inside the IHDR chunk: its CRC no longer matches
    yield "bad-crc.png", bytes(bad_crc)
    # A decompression bomb: a 100000 x 100000 PNG header over a few bytes of data.
    bomb = bytearray(png)
    struct.pack_into(">II", bomb, 16, 100000, 100000)
    yield "bomb-100000x100000.png", bytes(bomb)
    yield "jpeg-named.png", jpeg[: len(jpeg) // 3]


def other_cases() -> Iterator[Case]:
    rng = np.random.default_rng(17)
    for suffix in (".dcm", ".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ""):
        yield f"empty{suffix}", b""
    # Zip archives are unpacked (a good one is among the good inputs): these are refused.
    yield "not-a-zip.zip", rng.bytes(900)
    slip = io.BytesIO()
    with zipfile.ZipFile(slip, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("../../scan.png", good_png())  # would land outside the inbox
    yield "zip-slip.zip", slip.getvalue()
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.dcm", bytes(200 * 1024 * 1024))  # 200 MB of zeros, ~200 KB packed
    yield "zip-bomb.zip", bomb.getvalue()
    yield "study.tar.gz", gzip.compress(rng.bytes(2000))
    yield "notes.txt", b"patient notes\n"
    yield "report.pdf", b"%PDF-1.4\n" + rng.bytes(500)
    yield "scan.gz", gzip.compress(good_png())
    yield "no-extension", rng.bytes(700)
    yield "program.exe", b"MZ" + rng.bytes(1000)
    odd = [
        "space in name.dcm",
        "-leading-dash.png",
        "unicodé-名前.nii",
        "emoji-\U0001f9e0.png",
        "quote'and\"double.dcm",
        "back\\slash.png",
        "percent%20and&amp.nii.gz",
        "semi;colon$(touch x).dcm",
        "tab\tin-name.png",
        "x" * 200 + ".dcm",
    ]
    for name in odd:
        yield name, rng.bytes(300)


def all_cases() -> list[Case]:
    cases = [
        *(("dicom-" + n, b) for n, b in dicom_cases()),
        *(("nifti-" + n, b) for n, b in nifti_cases()),
        *(("image-" + n, b) for n, b in image_cases()),
        *other_cases(),
    ]
    return [(f"{i:03d}-{name}", data) for i, (name, data) in enumerate(cases)]
