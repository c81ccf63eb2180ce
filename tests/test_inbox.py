from __future__ import annotations

import os
from pathlib import Path

from pipeline.inbox import StabilityTracker, ignored


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_file_is_taken_only_after_settle_time_without_changes(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(settle_seconds=2.0, clock=clock)
    f = tmp_path / "scan.nii.gz"
    f.write_bytes(b"x" * 10)
    tracker.touch(f)
    clock.t = 1.0
    assert tracker.stable() == []
    # Still growing: the quiet period starts again.
    with f.open("ab") as out:
        out.write(b"y" * 10)
    clock.t = 2.5
    assert tracker.stable() == []
    clock.t = 4.0
    assert tracker.stable() == []
    clock.t = 4.6
    assert tracker.stable() == [f]
    assert tracker.stable() == []  # handed out once


def test_an_event_restarts_the_quiet_period(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(settle_seconds=2.0, clock=clock)
    f = tmp_path / "a.png"
    f.write_bytes(b"1")
    tracker.touch(f)
    clock.t = 1.9
    tracker.touch(f)  # e.g. a write that kept the size (rewrite in place)
    clock.t = 3.0
    assert tracker.stable() == []
    clock.t = 4.0
    assert tracker.stable() == [f]


def test_mtime_change_with_same_size_is_a_change(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(settle_seconds=1.0, clock=clock)
    f = tmp_path / "a.png"
    f.write_bytes(b"1")
    tracker.touch(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    clock.t = 1.5
    assert tracker.stable() == []
    clock.t = 2.6
    assert tracker.stable() == [f]


def test_vanished_file_is_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(settle_seconds=0.0, clock=clock)
    f = tmp_path / "a.png"
    f.write_bytes(b"1")
    tracker.touch(f)
    f.unlink()
    assert tracker.stable() == []
    assert len(tracker) == 0


def test_partial_and_hidden_names_are_ignored(tmp_path: Path) -> None:
    patterns = ("*.part", ".*", "*.tmp")
    assert ignored(tmp_path / "scan.png.part", tmp_path, patterns)
    assert ignored(tmp_path / ".scan.png", tmp_path, patterns)
    assert ignored(tmp_path / ".hidden" / "scan.png", tmp_path, patterns)
    assert not ignored(tmp_path / "sub" / "scan.png", tmp_path, patterns)
