"""When is a study complete? On a signal where there is one, on a timer where there is not.

A study is complete at the first of: every association that sent to it was released and
nothing more arrived for a short grace period; the modality reported MPPS COMPLETED and every
instance it lists is here; no instance for the quiet period; the maximum wait. Peers wait a
fixed 5-60 s quiet period in every case.

With early start (the default) a released study is handed over at once and the grace period
runs while it is processed: the job carries ``hold_until`` and the worker writes its results
only after it, and only if nothing more of the study arrived
(:mod:`pipeline.studies.study_job`). The wait then costs nothing unless processing is quicker
than the grace period.

:class:`StudyTracker` is pure bookkeeping over a clock (no threads, no I/O). :func:`close_study`
turns the study's spool folder into a job folder in one rename, so instances that arrive
afterwards start a new folder, a new round, and nothing is dropped or processed twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from pipeline.core.fsutil import atomic_write_json, fsync_dir
from pipeline.core.instances import SUFFIX, InvalidUIDError, check_uid, spool_lock
from pipeline.core.jobs import JOB_FILE, STUDY_FOLDER, Job, Reason, StudyRef, new_job_id, now
from pipeline.ingest.pull.plan import moved_marker

log = logging.getLogger(__name__)

# A release reported this soon after its own connection's close still counts (see _end).
LATE_RELEASE_S = 10.0

Clock = Callable[[], float]


@dataclass
class _Study:
    first: float
    last: float
    received_at: datetime
    sops: set[str] = field(default_factory=set)
    open_assocs: set[str] = field(default_factory=set)
    # Time of the last release, while no contributing association is open; None otherwise
    # and after an abort (a sender that broke off may come back: wait for the quiet period).
    released_at: float | None = None
    expected: frozenset[str] | None = None
    calling_aet: str | None = None
    called_aet: str | None = None


@dataclass(frozen=True)
class Completed:
    study_uid: str
    reason: Reason
    received_at: datetime
    calling_aet: str | None
    called_aet: str | None
    hold_s: float = 0.0  # early start: results wait this much longer (the rest of the grace)


class StudyTracker:
    """Studies being received, keyed by StudyInstanceUID; ``due()`` hands out complete ones."""

    def __init__(
        self,
        grace_s: float,
        quiet_s: float,
        max_wait_s: float,
        clock: Clock = time.monotonic,
        early_start: bool = False,
    ) -> None:
        self.grace = grace_s
        self.early = early_start
        self.quiet = quiet_s
        self.max_wait = max_wait_s
        self.clock = clock
        self._studies: dict[str, _Study] = {}
        self._assoc_studies: dict[str, set[str]] = {}
        # Associations that ended without a release so far: assoc -> (studies, when)
        self._closed: dict[str, tuple[set[str], float]] = {}
        # MPPS COMPLETED seen before (all) its study's instances: study -> (sops, since)
        self._expected: dict[str, tuple[frozenset[str], float]] = {}
        # MPPS COMPLETED that named no study: matched by SOP instance as instances arrive
        self._unbound: list[tuple[frozenset[str], float]] = []

    def __len__(self) -> int:
        return len(self._studies)

    def __contains__(self, study_uid: object) -> bool:
        return study_uid in self._studies

    def stored(
        self,
        study_uid: str,
        sop_uid: str,
        assoc: str,
        calling_aet: str | None = None,
        called_aet: str | None = None,
    ) -> None:
        t = self.clock()
        st = self._studies.get(study_uid)
        if st is None:
            st = self._studies[study_uid] = _Study(first=t, last=t, received_at=now())
            if study_uid in self._expected:
                st.expected = self._expected.pop(study_uid)[0]
        st.last = t
        st.sops.add(sop_uid)  # a set: a re-sent instance is not counted twice
        st.open_assocs.add(assoc)
        st.released_at = None
        st.calling_aet, st.called_aet = calling_aet or st.calling_aet, called_aet or st.called_aet
        self._assoc_studies.setdefault(assoc, set()).add(study_uid)
        if st.expected is None and self._unbound:
            for i, (sops, _) in enumerate(self._unbound):
                if sop_uid in sops:
                    st.expected = sops
                    del self._unbound[i]
                    break

    def released(self, assoc: str) -> None:
        """The association ended with an A-RELEASE: its sender says it is done."""
        self._end(assoc, clean=True)

    def aborted(self, assoc: str) -> None:
        """The association was aborted or the connection dropped (also called after a release:
        then it is a no-op)."""
        self._end(assoc, clean=False)

    def _end(self, assoc: str, clean: bool) -> None:
        t = self.clock()
        studies = self._assoc_studies.pop(assoc, None)
        late_release = False
        if studies is None:
            if not clean or (closed := self._closed.pop(assoc, None)) is None:
                return  # e.g. the connection closing after a release
            # pynetdicom reports the release from the association's thread and the connection's
            # close from its DUL thread, so the close can come first: the release decides.
            studies, late_release = closed[0], True
        elif not clean:
            self._closed[assoc] = (studies, t)
        for study_uid in studies:
            st = self._studies.get(study_uid)
            if st is None or (assoc not in st.open_assocs and not late_release):
                continue
            st.open_assocs.discard(assoc)
            if not clean:
                st.released_at = None
            elif not st.open_assocs:
                st.released_at = t

    def mpps_completed(self, study_uid: str | None, sop_uids: frozenset[str]) -> None:
        """The modality's MPPS says the procedure is done and lists what it produced."""
        if not sop_uids:
            return  # a list of nothing tells nothing: leave it to the other rules
        t = self.clock()
        if study_uid is not None and study_uid in self._studies:
            self._studies[study_uid].expected = sop_uids
        elif study_uid is not None:
            self._expected[study_uid] = (sop_uids, t)
        else:
            for uid, st in self._studies.items():
                if st.sops & sop_uids:
                    st.expected = sop_uids
                    log.debug("MPPS matched study %s by its instances", uid)
                    return
            self._unbound.append((sop_uids, t))

    def adopt(self, study_uid: str, sop_uids: set[str]) -> None:
        """A study found in the spool at start-up: its sender may resume, so its timers start
        now and no association release is assumed."""
        if study_uid in self._studies:
            return
        t = self.clock()
        self._studies[study_uid] = _Study(first=t, last=t, received_at=now(), sops=sop_uids)

    def due(self) -> list[Completed]:
        """Studies complete now; they are forgotten here (a later instance starts a new one)."""
        t = self.clock()
        done: list[Completed] = []
        for uid, st in list(self._studies.items()):
            reason = self._reason(st, t)
            if reason is None:
                continue
            del self._studies[uid]
            for assoc in st.open_assocs:
                self._assoc_studies.get(assoc, set()).discard(uid)
            hold = 0.0
            if reason is Reason.RELEASED and (quiet := _since_release(st, t)) is not None:
                hold = max(0.0, self.grace - quiet)
            done.append(Completed(uid, reason, st.received_at, st.calling_aet, st.called_aet, hold))
        self._closed = {k: v for k, v in self._closed.items() if t - v[1] < LATE_RELEASE_S}
        # Expectations whose study never came are dropped after the maximum wait.
        self._expected = {k: v for k, v in self._expected.items() if t - v[1] < self.max_wait}
        self._unbound = [u for u in self._unbound if t - u[1] < self.max_wait]
        return done

    def _reason(self, st: _Study, t: float) -> Reason | None:
        if st.expected is not None and st.expected <= st.sops:
            return Reason.MPPS
        if (quiet := _since_release(st, t)) is not None and (self.early or quiet >= self.grace):
            return Reason.RELEASED
        if t - st.last >= self.quiet:
            return Reason.QUIET
        if t - st.first >= self.max_wait:
            return Reason.MAX_WAIT
        return None


def _since_release(st: _Study, t: float) -> float | None:
    """Seconds since the study's last association was released and nothing more came; None
    while one is open or after an abort."""
    return None if st.released_at is None else t - max(st.released_at, st.last)


def spooled_studies(spool: Path) -> Iterator[tuple[str, set[str]]]:
    """Study folders in the spool (named by a valid UID) and the SOP instances in each."""
    if not spool.is_dir():
        return
    for folder in sorted(spool.iterdir()):
        try:
            check_uid(folder.name, "study folder")
        except InvalidUIDError:
            continue  # job folders, lock files, .incoming
        if folder.is_dir():
            yield folder.name, {p.stem for p in folder.glob(f"*/*{SUFFIX}")}


def close_study(spool: Path, done: Completed) -> Job | None:
    """Move the study folder into a new job folder (``spool/<job id>/study/``) and return the
    job; None if the folder holds no instance (e.g. it was closed already).

    Under the exclusive lock no instance is half-renamed into the folder, so the counts in
    job.json are exactly what the job holds. A crash between the steps is repaired at start-up
    by :func:`pipeline.core.jobs.recover_staging`.
    """
    folder = spool / check_uid(done.study_uid, "StudyInstanceUID")
    moved = moved_marker(spool, done.study_uid)  # a pull's C-MOVE brought it here
    reason = Reason.PULLED if moved.exists() else done.reason
    with spool_lock(spool, exclusive=True):
        if not folder.is_dir():
            return None
        series = {
            d.name: n
            for d in sorted(folder.iterdir())
            if d.is_dir() and (n := sum(1 for _ in d.glob(f"*{SUFFIX}")))
        }
        if not series:
            return None
        job = Job(
            id=new_job_id(),
            source="dicom",
            original_name=done.study_uid,
            input_file=STUDY_FOLDER,
            received_at=done.received_at,
            study=StudyRef(
                study_uid=done.study_uid,
                series=series,
                instances=sum(series.values()),
                calling_aet=done.calling_aet,
                called_aet=done.called_aet,
                completed_by=reason.value,
                hold_until=now() + timedelta(seconds=done.hold_s) if done.hold_s else None,
            ),
        )
        staging = spool / f".{job.id}"
        staging.mkdir()
        atomic_write_json(staging / JOB_FILE, job.model_dump(mode="json"))
        os.replace(folder, staging / STUDY_FOLDER)
        os.replace(staging, spool / job.id)
        fsync_dir(spool)
    moved.unlink(missing_ok=True)
    return job
