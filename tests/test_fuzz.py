"""Property-based fuzzing of the parsing paths (hypothesis): whatever the bytes, loading either
gives a usable image or fails with InputError; nothing else escapes."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.convert import grouping, series
from pipeline.convert import images as convert
from pipeline.core.errors import InputError

from .bad_inputs import good_nifti, good_png, good_slice

GOOD = {
    ".dcm": None,  # filled lazily: pydicom encodes on first use
    ".nii": good_nifti(),
    ".png": good_png(),
}


def _good(suffix: str) -> bytes:
    if GOOD[suffix] is None:
        buffer = io.BytesIO()
        good_slice().save_as(buffer, enforce_file_format=True)
        GOOD[suffix] = buffer.getvalue()
    data = GOOD[suffix]
    assert data is not None
    return data


# Edits of a valid file: bytes overwritten at positions, then maybe cut short.
edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12)


def _mutate(data: bytes, changes: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in changes:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut else out)


def _loads_or_refuses(path: Path) -> None:
    try:
        image = convert.load(path)
    except InputError:
        return
    assert image.array.numel() > 0
    assert np.isfinite(np.asarray(image.array)).all()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    suffix=st.sampled_from([".dcm", ".nii", ".png"]),
    changes=edits,
    cut=st.none() | st.integers(1, 20_000),
)
def test_mutated_files_load_or_fail_with_input_error(
    suffix: str, changes: list[tuple[int, int]], cut: int | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(_mutate(_good(suffix), changes, cut))
        _loads_or_refuses(path)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=2048), suffix=st.sampled_from([*GOOD, ".jpg"]))
def test_arbitrary_bytes_fail_with_input_error(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(data)
        _loads_or_refuses(path)


@settings(max_examples=150, deadline=None)
@given(changes=edits, cut=st.none() | st.integers(1, 20_000), victim=st.integers(0, 3))
def test_a_mutated_slice_never_breaks_series_loading(
    changes: list[tuple[int, int]], cut: int | None, victim: int
) -> None:
    """A series with one damaged file: grouped without raising; loaded into a volume, or
    refused with InputError."""
    from pipeline.demo.dicom_series import new_series, write_series

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_series(Path(tmp), new_series(slices=4, rows=16, cols=16))
        paths[victim].write_bytes(_mutate(paths[victim].read_bytes(), changes, cut))
        groups, _skipped = grouping.group_series(paths)
        for group in groups:
            try:
                volume = series.load_series(group.paths)
            except InputError:
                continue
            assert np.isfinite(volume.array).all()
