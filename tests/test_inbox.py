from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from pipeline.demo.dicom_series import new_series, write_series
from pipeline.demo.synthetic import write_mednist_png
from pipeline.dicom_store import INBOX_FILES, file_identity, place_file
from pipeline.dicomnet.receiver import Receiver
from pipeline.inbox import InboxWatcher, SettlingStudies, StabilityTracker, ignored
from pipeline.jobs import Job

from .conftest import make_settings


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


def test_a_study_settles_after_its_quiet_time_unless_its_folder_is_still_being_written() -> None:
    clock = Clock()
    studies = SettlingStudies(quiet_s=3.0, max_wait_s=100.0, clock=clock)
    studies.taken("1.2.3", "cd")
    clock.t = 2.0
    studies.taken("1.2.3", "cd")  # a second file restarts the quiet time
    clock.t = 4.9
    assert studies.due(set()) == []
    clock.t = 5.1
    # A file in the same dropped folder is still being copied: not yet.
    assert studies.due({"cd"}) == []
    # Files pending elsewhere in the inbox do not hold it.
    ((uid, _),) = studies.due({"other.png"})
    assert uid == "1.2.3" and "1.2.3" not in studies
    assert studies.due(set()) == []  # handed out once


def test_a_study_is_closed_at_the_maximum_wait_even_while_files_keep_coming() -> None:
    clock = Clock()
    studies = SettlingStudies(quiet_s=3.0, max_wait_s=10.0, clock=clock)
    for t in range(11):
        clock.t = float(t)
        studies.taken("1.2.3", "cd")
        due = [uid for uid, _ in studies.due({"cd"})]
        assert due == ([] if t < 10 else ["1.2.3"])


def test_an_adopted_study_settles_from_its_adoption() -> None:
    clock = Clock()
    studies = SettlingStudies(quiet_s=3.0, max_wait_s=100.0, clock=clock)
    clock.t = 50.0
    studies.adopt("1.2.3")
    clock.t = 52.0
    assert studies.due(set()) == []
    clock.t = 53.0
    assert [uid for uid, _ in studies.due(set())] == ["1.2.3"]


def test_dicom_files_dropped_into_the_inbox_become_one_job_per_study(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CT series copied from a CD (files without a suffix, in a folder) is one study job, as
    if a PACS had sent it; a single DICOM image is a study of its own; other files stay jobs
    of their own; a second copy of an instance is refused with the reason, and kept."""
    caplog.set_level(logging.INFO, logger="pipeline.inbox")
    settings = make_settings(tmp_path / "data", inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3})
    settings.ensure_dirs()
    staging = tmp_path / "staging"
    ct = new_series(slices=20, rows=32, cols=32)
    cd = staging / "cd" / "DICOM"
    cd.mkdir(parents=True)
    for k, path in enumerate(write_series(staging / "ct", ct), start=1):
        os.replace(path, cd / f"IM{k:05d}")
    shutil.copy(cd / "IM00001", cd / "IM00001 copy")
    single = new_series(slices=1)
    (xray,) = write_series(staging / "xray", single)
    write_mednist_png(staging / "hand.png", "Hand", 1)

    jobs: list[Job] = []

    def enqueue(job: Job) -> bool:
        jobs.append(job)
        return True

    watcher = InboxWatcher(settings, enqueue)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        for item in (staging / "cd", xray, staging / "hand.png"):
            os.replace(item, settings.inbox_dir / item.name)
        deadline = time.monotonic() + 30
        while len(jobs) < 3 or not any(settings.failed_dir.iterdir()):
            assert time.monotonic() < deadline, (jobs, list(settings.failed_dir.iterdir()))
            time.sleep(0.05)
        time.sleep(1.0)  # nothing more comes
    finally:
        stop.set()
        thread.join()

    assert not [p for p in settings.inbox_dir.rglob("*") if not p.is_dir()]  # all taken
    by_name = {job.original_name: job for job in jobs}
    assert set(by_name) == {ct.study_uid, single.study_uid, "hand.png"}, jobs
    study = by_name[ct.study_uid].study
    assert study is not None and study.completed_by == "inbox-settled"
    assert study.series == {ct.series_uid: 20} and study.calling_aet is None
    folder = settings.spool_dir / by_name[ct.study_uid].id / "study"
    assert len(list((folder / ct.series_uid).glob("*.dcm"))) == 20
    # Which file each instance came from, for errors that name instances by UID.
    names = [json.loads(line)["file"] for line in (folder / INBOX_FILES).read_text().splitlines()]
    assert sorted(names) == [f"cd/DICOM/IM{k:05d}" for k in range(1, 21)]
    xray_study = by_name[single.study_uid].study
    assert xray_study is not None and xray_study.series == {single.series_uid: 1}
    assert by_name["hand.png"].study is None and by_name["hand.png"].source == "inbox"

    (refused,) = settings.failed_dir.iterdir()
    error = json.loads((refused / "error.json").read_text())
    assert error["stage"] == "intake" and error["original_name"] == "cd/DICOM/IM00001 copy"
    assert "already among the files gathered for study" in error["message"]
    assert (refused / "IM00001 copy").is_file()
    # Said once per study, by UID (the folder's name may carry a patient's).
    gathering = [r.getMessage() for r in caplog.records if "gathering" in r.getMessage()]
    assert sorted(gathering) == sorted(
        f"inbox: gathering the DICOM files of study {uid}"
        for uid in (ct.study_uid, single.study_uid)
    )


def test_a_study_left_gathering_by_an_earlier_run_is_finished_by_the_watcher(
    tmp_path: Path,
) -> None:
    """After a restart the watcher completes the inbox studies left in the spool; the
    receiver leaves them alone (it would cut them after its quiet period, blind to files
    still being copied into the inbox)."""
    settings = make_settings(tmp_path / "data", inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3})
    settings.ensure_dirs()
    spec = new_series(slices=3, rows=16, cols=16)
    for path in write_series(tmp_path / "src", spec):
        uids = file_identity(path)
        assert uids is not None
        assert place_file(settings.spool_dir, uids, path, json.dumps({"file": path.name}))

    receiver = Receiver(settings, lambda _job: True)
    receiver._adopt()
    assert spec.study_uid not in receiver.tracker

    jobs: list[Job] = []

    def enqueue(job: Job) -> bool:
        jobs.append(job)
        return True

    stop = threading.Event()
    thread = threading.Thread(target=InboxWatcher(settings, enqueue).run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not jobs:
            assert time.monotonic() < deadline, "the left study was not finished"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    (job,) = jobs
    assert job.study is not None and job.study.series == {spec.series_uid: 3}
    assert job.study.completed_by == "inbox-settled"
