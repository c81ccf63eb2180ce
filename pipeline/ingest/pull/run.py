"""A pull: the matched studies retrieved at most ``max_parallel`` at once, with a pause
between one and the next, each handed over like a received study once every instance the
PACS counted is here (no quiet period to wait), through the same spool, routing, results and
destinations. The list lives in the spool (:mod:`.plan`): a pull interrupted, by Ctrl-C or a
crash, is resumed where it stopped; a study retrieved part-way keeps what arrived and is
asked again, and one that still fails is a failed item with the reason."""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset

from pipeline.core import observe
from pipeline.core.fsutil import atomic_write_json
from pipeline.core.instances import adopt_instance, file_identity
from pipeline.core.jobs import Job, Reason
from pipeline.core.network_settings import Source
from pipeline.core.settings import Settings
from pipeline.ingest.completion import Completed
from pipeline.ingest.pull import peer, web
from pipeline.ingest.pull.plan import PULLS, Pull, PulledStudy, moved_marker, save, staging

log = logging.getLogger(__name__)

Close = Callable[[Completed], Job | None]  # the producer's: the study becomes a queued job
Report = Callable[[PulledStudy], None]  # told of each study's progress and end


def has_results(settings: Settings, study_uid: str) -> bool:
    """A study with a study.json in results was processed before: skipped unless forced."""
    return (settings.results_dir / study_uid / "study.json").is_file()


def run_pull(settings: Settings, pull: Pull, close: Close, report: Report) -> Pull:
    """Retrieve every pending study of ``pull``; returns it, saved, with each study's end."""
    source = settings.sources[pull.source]
    lock = threading.Lock()  # one writer of the pull's file at a time
    stop = threading.Event()  # set by an interruption: no study is started after it

    def one(study: PulledStudy) -> None:
        if stop.is_set():
            return
        try:
            _one(study)
        except BaseException:
            stop.set()
            raise

    def _one(study: PulledStudy) -> None:
        if not pull.force and has_results(settings, study.study_uid):
            study.state, study.reason = "skipped", "has results (use --force to run again)"
        else:
            _retrieve(settings, pull, study, close, report)
        with lock:
            save(settings.spool_dir, pull)
        report(study)
        time.sleep(source.pause_s)

    # max_parallel workers: at most that many studies are being retrieved at once
    with ThreadPoolExecutor(max_workers=source.max_parallel) as pool:
        futures = [pool.submit(one, s) for s in pull.pending]
        try:
            for future in futures:
                future.result()
        except BaseException:  # Ctrl-C: what is being retrieved ends, nothing more starts
            stop.set()
            raise
    with contextlib.suppress(OSError):  # empty once every study was handed over
        (settings.spool_dir / PULLS / pull.id).rmdir()
    return pull


def _retrieve(
    settings: Settings, pull: Pull, study: PulledStudy, close: Close, report: Report
) -> None:
    """Retrieve one study (with retries while it fails part-way) and hand it over."""
    source = settings.sources[pull.source]
    into = staging(settings.spool_dir, pull, study.study_uid)
    error = "not retrieved"
    for attempt in range(source.retries + 1):
        if attempt:
            time.sleep(min(60.0, 2.0**attempt))
        try:
            got = _ask(settings, pull, study, into, report)
        except (peer.PeerError, OSError) as exc:
            error = str(exc)
            observe.count("pull_failures", pull.source)
            continue
        staged = len(list(into.glob("*.dcm")))
        study.received = got.completed if _moved(settings, pull) else staged
        observe.count("pulled_instances", pull.source, amount=got.completed)
        if got.whole:
            _hand_over(settings, pull, study, into, close)
            return
        error = got.error or f"{got.failed} of the study's instances were not sent"
        if study.received:
            error += f"; {study.received} instances came and are kept"
        log.warning("pull %s: study retrieve incomplete (%s), asking again", pull.id, error)
    study.state, study.reason = "failed", error
    _failed_item(settings, pull, study)


def _ask(
    settings: Settings, pull: Pull, study: PulledStudy, into: Path, report: Report
) -> peer.Retrieved:
    source = settings.sources[pull.source]
    if source.url is None and source.retrieve == "move":
        marker = moved_marker(settings.spool_dir, study.study_uid)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(pull.id)  # before the instances can arrive
        destination = source.move_destination or settings.receiver.ae_title
        moved = peer.Retrieved(error="not asked")
        try:
            moved = peer.move(source, study.study_uid, destination)
        finally:
            if moved.completed == 0:
                marker.unlink(missing_ok=True)  # nothing came: nothing to mark
        return moved

    def progress(n: int) -> None:
        study.received = n
        if n % 50 == 0:
            report(study)

    if source.url is not None:
        return web.get(source, study.study_uid, into, progress, study.expected)
    return peer.get(source, study.study_uid, into, progress, tuple(study.sop_classes))


def _hand_over(
    settings: Settings, pull: Pull, study: PulledStudy, into: Path, close: Close
) -> None:
    """The staged instances into the study's spool folder, then the study closed into a job:
    complete now, since every instance the PACS counted is here. A C-MOVE's instances went to
    the receiver, which completes the study when the PACS's association ends."""
    study.state = "done"
    observe.count("pulled_studies", pull.source)
    if _moved(settings, pull):
        return
    for path in sorted(into.glob("*.dcm")):
        uids = file_identity(path)
        if uids is None or uids.study != study.study_uid:
            log.warning("pull %s: an instance not of the study asked for, left out", pull.id)
            path.unlink()
            continue
        adopt_instance(settings.spool_dir, uids, path)  # under the spool's shared lock
    shutil.rmtree(into, ignore_errors=True)
    source = settings.sources[pull.source]
    job = close(Completed(study.study_uid, Reason.PULLED, datetime.now(UTC), source.ae_title, None))
    study.job_id = job.id if job else None


def _moved(settings: Settings, pull: Pull) -> bool:
    """Retrieved by C-MOVE: the instances went to our receiver, not to the pull."""
    source = settings.sources[pull.source]
    return source.url is None and source.retrieve == "move"


def find(source: Source, criteria: peer.Criteria) -> list[peer.Match]:
    """The studies a source holds that match ``criteria``: C-FIND or QIDO-RS."""
    return web.find(source, criteria) if source.url else peer.find(source, criteria)


def series_of(source: Source, study_uid: str) -> list[Dataset]:
    """A study's series as the source describes them: C-FIND or QIDO-RS."""
    return web.series_of(source, study_uid) if source.url else peer.series_of(source, study_uid)


def record_unmatched(settings: Settings, source: str, unmatched: list[str]) -> Path:
    """A failed item for the criteria of a pull that matched nothing on the source (an
    accession number mistyped in a research list, a study deleted since)."""
    name = f"pull-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-unmatched"
    message = f"no match on {source}: " + "; ".join(unmatched)
    return _failed(settings, name, "NoMatch", message, {"source": source, "unmatched": unmatched})


def _failed_item(settings: Settings, pull: Pull, study: PulledStudy) -> None:
    """``data/failed/pull-<id>-<n>/error.json`` says what failed; what arrived stays staged
    under the pull for `pull --resume` to complete."""
    name = f"pull-{pull.id}-{pull.studies.index(study) + 1}"
    job = {"pull": pull.id, "source": pull.source, "study_uid": study.study_uid}
    _failed(settings, name, "PullError", study.reason or "", job)


def _failed(
    settings: Settings, name: str, kind: str, message: str, job: Mapping[str, object]
) -> Path:
    """A failed item of a pull: ``data/failed/<name>/error.json``."""
    folder = settings.failed_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "type": kind,
        "message": message,
        "stage": "pull",
        "time": datetime.now(UTC).isoformat(),
        "job": job,
    }
    atomic_write_json(folder / "error.json", record)
    return folder
