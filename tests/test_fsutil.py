"""Results appear complete, and a result.json only after the files it describes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.core.fsutil import atomic_write_in_phases, move, move_into


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_every_file_is_written_whole_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    files = {
        tmp_path / f"m{i}" / name: bytes([i]) * (1000 * i + 1)
        for i in range(3)
        for name in ("a", "b")
    }
    study = tmp_path / "study.json"
    atomic_write_in_phases([list(files.items()), [(study, b"{}\n")]])
    assert all(path.read_bytes() == data for path, data in files.items())
    assert study.read_bytes() == b"{}\n"
    assert not _leftovers(tmp_path)


def test_a_later_phase_that_fails_leaves_the_earlier_phases_in_place(tmp_path: Path) -> None:
    preview, sr = tmp_path / "m" / "preview.png", tmp_path / "m" / "sr.dcm"
    result = tmp_path / "m" / "result.json"
    result.mkdir(parents=True)  # a folder where result.json should go: its rename fails
    with pytest.raises(OSError):
        atomic_write_in_phases([[(preview, b"png"), (sr, b"dcm")], [(result, b"{}")]])
    assert preview.read_bytes() == b"png" and sr.read_bytes() == b"dcm"
    assert result.is_dir() and not list(result.iterdir())
    assert not _leftovers(tmp_path)


def test_a_file_that_cannot_be_written_means_none_appears(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_bytes(b"a file where a folder should be")
    good, bad = tmp_path / "ok" / "sr.dcm", tmp_path / "blocked" / "seg.dcm"
    with pytest.raises(OSError):
        atomic_write_in_phases([[(good, b"dcm"), (bad, b"seg")], [(tmp_path / "ok" / "r", b"")]])
    assert not good.exists()
    assert not _leftovers(tmp_path)


def test_a_move_across_filesystems_lands_whole_and_leaves_nothing(tmp_path: Path) -> None:
    """The inbox may be on another disk than the spool and failed/ (a share): a file and a
    folder moved from tmpfs arrive whole under their names, no .moving file left."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) here")
    src = Path(tempfile.mkdtemp(dir=shm))
    try:
        (src / "scan.dcm").write_bytes(b"D" * 5000)
        (src / "cd" / "DICOM").mkdir(parents=True)
        (src / "cd" / "DICOM" / "IM1").write_bytes(b"I" * 300)
        move(src / "scan.dcm", tmp_path / "1.2.3.dcm")
        moved = move_into(src / "cd", tmp_path / "failed")
        assert (tmp_path / "1.2.3.dcm").read_bytes() == b"D" * 5000
        assert (moved / "DICOM" / "IM1").read_bytes() == b"I" * 300
        assert not list(src.iterdir())
        assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".moving")]
    finally:
        shutil.rmtree(src, ignore_errors=True)
