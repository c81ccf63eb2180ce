"""Study completion rules, on a controlled clock, and the spool folder -> job hand-over."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from pipeline.core.instances import InstanceUIDs, InvalidUIDError, check_uid, store_instance
from pipeline.core.jobs import STUDY_FOLDER, Reason, now, read_job, recover_staging
from pipeline.ingest.completion import Completed, StudyTracker, close_study, spooled_studies


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(clock: Clock) -> StudyTracker:
    return StudyTracker(grace_s=2.0, quiet_s=60.0, max_wait_s=600.0, clock=clock)


def test_release_completes_after_grace_not_before(tracker: StudyTracker, clock: Clock) -> None:
    for i in range(3):
        tracker.stored("1.2.3", f"1.2.3.{i}", "a1", "CT01", "PIPELINE")
    tracker.released("a1")
    clock.t += 1.9
    assert tracker.due() == []
    clock.t += 0.2
    [done] = tracker.due()
    assert done.study_uid == "1.2.3" and done.reason is Reason.RELEASED
    assert (done.calling_aet, done.called_aet) == ("CT01", "PIPELINE")
    assert tracker.due() == [] and len(tracker) == 0


def test_early_start_hands_over_at_release_and_holds_the_rest_of_the_grace(
    clock: Clock, tmp_path: Path
) -> None:
    early = StudyTracker(grace_s=2.0, quiet_s=60.0, max_wait_s=600.0, clock=clock, early_start=True)
    early.stored("1.2.3", "1.2.3.1", "a1")
    early.stored("1.2.3", "1.2.3.2", "a2")
    early.released("a1")
    assert early.due() == []  # a2 may still send to it
    early.released("a2")
    clock.t += 0.5
    [done] = early.due()
    assert done.reason is Reason.RELEASED and done.hold_s == pytest.approx(1.5)
    spool = tmp_path / "spool"
    spool.mkdir()
    _store(spool, "1.2.3", "1.2.3.4", "1.2.3.4.1")
    before = now()
    job = close_study(spool, done)
    assert job is not None and job.study is not None and job.study.hold_until is not None
    assert 1.4 < (job.study.hold_until - before).total_seconds() < 2.0
    # Other reasons carry no hold: the study is complete when they fire.
    early.stored("1.2.4", "1.2.4.1", "a3")
    clock.t += 60
    [quiet] = early.due()
    assert quiet.reason is Reason.QUIET and quiet.hold_s == 0.0


def test_open_association_holds_a_study_released_by_another(
    tracker: StudyTracker, clock: Clock
) -> None:
    tracker.stored("1.2.3", "1.2.3.1", "a1")
    tracker.stored("1.2.3", "1.2.3.2", "a2")
    tracker.released("a1")
    clock.t += 10
    assert tracker.due() == []  # a2 may still send to it
    tracker.released("a2")
    clock.t += 2
    assert [d.reason for d in tracker.due()] == [Reason.RELEASED]


def test_abort_waits_for_quiet_period(tracker: StudyTracker, clock: Clock) -> None:
    tracker.stored("1.2.3", "1.2.3.1", "a1")
    tracker.aborted("a1")
    clock.t += 59
    assert tracker.due() == []  # the sender broke off and may come back
    clock.t += 1
    assert [d.reason for d in tracker.due()] == [Reason.QUIET]


def test_release_then_close_is_still_a_release(tracker: StudyTracker, clock: Clock) -> None:
    tracker.stored("1.2.3", "1.2.3.1", "a1")
    tracker.released("a1")
    tracker.aborted("a1")  # the connection closing after A-RELEASE
    clock.t += 2
    assert [d.reason for d in tracker.due()] == [Reason.RELEASED]


def test_close_reported_before_its_release_is_still_a_release(
    tracker: StudyTracker, clock: Clock
) -> None:
    tracker.stored("1.2.3", "1.2.3.1", "a1")
    tracker.aborted("a1")  # pynetdicom's DUL thread saw the close first
    tracker.released("a1")
    clock.t += 2
    assert [d.reason for d in tracker.due()] == [Reason.RELEASED]


def test_instance_after_release_restarts_grace(tracker: StudyTracker, clock: Clock) -> None:
    tracker.stored("1.2.3", "1.2.3.1", "a1")
    tracker.released("a1")
    clock.t += 1.5
    tracker.stored("1.2.3", "1.2.3.2", "a2")  # the next association of the same sender
    clock.t += 1.5
    assert tracker.due() == []
    tracker.released("a2")
    clock.t += 2
    assert [d.reason for d in tracker.due()] == [Reason.RELEASED]


def test_mpps_completes_when_every_listed_instance_is_here(
    tracker: StudyTracker, clock: Clock
) -> None:
    tracker.mpps_completed("1.2.3", frozenset({"1.2.3.1", "1.2.3.2"}))  # before the images
    tracker.stored("1.2.3", "1.2.3.1", "a1")
    assert tracker.due() == []
    tracker.stored("1.2.3", "1.2.3.2", "a1")  # association still open
    assert [d.reason for d in tracker.due()] == [Reason.MPPS]


def test_mpps_without_study_uid_matches_by_instance(tracker: StudyTracker) -> None:
    tracker.stored("1.2.3", "1.2.3.1", "a1")
    tracker.mpps_completed(None, frozenset({"1.2.3.1", "1.2.3.2"}))
    assert tracker.due() == []
    tracker.stored("1.2.3", "1.2.3.2", "a1")
    assert [d.reason for d in tracker.due()] == [Reason.MPPS]


def test_max_wait_bounds_a_study_that_never_stops(tracker: StudyTracker, clock: Clock) -> None:
    closed_at = []
    for i in range(700):
        tracker.stored("1.2.3", f"1.2.3.{i}", "a1")  # one per second: never quiet
        closed_at += [(i, d.reason) for d in tracker.due()]
        clock.t += 1
    assert closed_at == [(600, Reason.MAX_WAIT)]


def test_duplicates_are_not_counted_twice_and_rounds_restart(
    tracker: StudyTracker, clock: Clock
) -> None:
    tracker.stored("1.2.3", "1.2.3.1", "a1")
    tracker.stored("1.2.3", "1.2.3.1", "a1")
    tracker.released("a1")
    clock.t += 2
    assert len(tracker.due()) == 1
    tracker.stored("1.2.3", "1.2.3.9", "a2")  # arrives after the study was handed over
    assert "1.2.3" in tracker  # a new round, not dropped


@pytest.mark.parametrize(
    "bad", ["", "../../etc", "1.2/3", "1.2.03", "1.2.3.", "1.2.3\n", "1" * 65, "1.2.3 ", "a.b"]
)
def test_invalid_uids_never_become_paths(bad: str) -> None:
    with pytest.raises(InvalidUIDError):
        check_uid(bad, "StudyInstanceUID")


def _store(spool: Path, study: str, series: str, sop: str, data: bytes = b"x") -> bool:
    return store_instance(spool, InstanceUIDs(study, series, sop), [data], 0)


def test_close_study_moves_the_folder_and_counts_what_is_on_disk(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    assert not _store(spool, "1.2.3", "1.2.3.4", "1.2.3.4.1", b"first")
    assert _store(spool, "1.2.3", "1.2.3.4", "1.2.3.4.1", b"again")  # replaced, not added
    _store(spool, "1.2.3", "1.2.3.4", "1.2.3.4.2")
    _store(spool, "1.2.3", "1.2.3.5", "1.2.3.5.1")
    assert dict(spooled_studies(spool)) == {"1.2.3": {"1.2.3.4.1", "1.2.3.4.2", "1.2.3.5.1"}}
    job = close_study(spool, Completed("1.2.3", Reason.RELEASED, _now(), "CT01", "PIPELINE"))
    assert job is not None and job.study is not None
    assert job.study.series == {"1.2.3.4": 2, "1.2.3.5": 1} and job.study.instances == 3
    assert not (spool / "1.2.3").exists()
    assert read_job(spool / job.id) == job
    stored = spool / job.id / STUDY_FOLDER / "1.2.3.4" / "1.2.3.4.1.dcm"
    assert stored.read_bytes() == b"again"
    assert not list((spool / ".incoming").iterdir())  # no temporary file left
    # An instance arriving now starts a new folder: the next round.
    _store(spool, "1.2.3", "1.2.3.4", "1.2.3.4.3")
    assert dict(spooled_studies(spool)) == {"1.2.3": {"1.2.3.4.3"}}
    assert close_study(spool, Completed("9.9", Reason.QUIET, _now(), None, None)) is None


def test_half_made_job_is_promoted_at_start_up(tmp_path: Path) -> None:
    spool, inbox = tmp_path / "spool", tmp_path / "inbox"
    spool.mkdir()
    inbox.mkdir()
    _store(spool, "1.2.3", "1.2.3.4", "1.2.3.4.1")
    job = close_study(spool, Completed("1.2.3", Reason.QUIET, _now(), None, None))
    assert job is not None
    (spool / job.id).rename(spool / f".{job.id}")  # as if the last rename never happened
    # and an inbox file whose job.json was never written
    (spool / ".20260101T000000Z-0000abcd").mkdir()
    (spool / ".20260101T000000Z-0000abcd" / "scan.png").write_bytes(b"png")
    recover_staging(spool, inbox)
    assert read_job(spool / job.id) == job
    assert (inbox / "scan.png").read_bytes() == b"png"
    assert sorted(p.name for p in spool.iterdir() if not p.name.startswith(".")) == [job.id]


def _now() -> datetime:
    return now()
