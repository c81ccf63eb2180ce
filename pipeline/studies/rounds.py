"""Rounds of one study: instances that came after the study was handed over make a new job, a
new round, processed with what the earlier rounds left.

Rounds of one study run one at a time, under a lock, because each reads and extends the
study's ``study.json``. A late instance joins its series from the earlier rounds (kept in the
archive). A round handed over early (``hold_until``, see :mod:`pipeline.ingest.completion`)
waits until that time and then looks for more of the study in the spool: if there is, it is
superseded, and the next round processes its series together with the new instances.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import AbstractContextManager
from pathlib import Path

from pipeline.core.fsutil import flocked
from pipeline.core.instances import SUFFIX
from pipeline.core.jobs import STUDY_FOLDER, Job, is_job_id, now, read_job
from pipeline.core.results import StudyResult
from pipeline.core.settings import Settings

log = logging.getLogger(__name__)

ROUND_LOCKS = ".study-locks"  # in the spool: one lock file per bucket of study UIDs
SUPERSEDED = (
    "more instances of the study arrived within the release grace period: this series is "
    "processed again with them in the next round"
)


def round_lock(settings: Settings, study_uid: str) -> AbstractContextManager[None]:
    """Held while a round runs. 256 lock files whatever the number of studies: two studies
    that share one only take turns."""
    bucket = hashlib.sha256(study_uid.encode()).hexdigest()[:2]
    locks = settings.spool_dir / ROUND_LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    return flocked(locks / f"{bucket}.lock")


def superseded(job: Job, settings: Settings) -> bool:
    """For a round handed over early: wait until its hold time, then tell whether more of its
    study is in the spool (being received, or a later round waiting). Without an archive the
    round's instances would be gone before the next round could use them: it then stands."""
    assert job.study is not None
    if job.study.hold_until is None or not settings.worker.archive_inputs:
        return False
    if (wait := (job.study.hold_until - now()).total_seconds()) > 0:
        time.sleep(wait)
    spool, uid = settings.spool_dir, job.study.study_uid
    if any((spool / uid).glob(f"*/*{SUFFIX}")):
        return True
    for entry in spool.iterdir():
        if entry.name == job.id or not is_job_id(entry.name):
            continue
        try:
            other = read_job(entry)
        except (OSError, ValueError):
            continue  # finished and moved meanwhile, or half-made (then not yet ours to see)
        if other.study is not None and other.study.study_uid == uid:
            return True
    return False


def earlier_round(path: Path) -> StudyResult | None:
    try:
        return StudyResult.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): this round is processed on its own", path, exc)
        return None


def earlier_instances(
    settings: Settings, earlier: StudyResult | None, series_uids: set[str]
) -> dict[str, Path]:
    """Instances of the touched series from the study's earlier rounds (kept in the archive),
    by SOP Instance UID (the receiver names files by it); oldest first, so later rounds win.

    A late instance thus joins its series instead of being processed alone."""
    found: dict[str, Path] = {}
    for job_id in earlier.rounds if earlier else []:
        # A round that failed keeps its instances in failed/ instead of the archive.
        folder = settings.archive_dir / job_id / STUDY_FOLDER
        if not folder.is_dir():
            folder = settings.failed_dir / job_id / STUDY_FOLDER
        for uid in series_uids:
            found.update({p.stem: p for p in (folder / uid).glob("*.dcm")})
    if earlier and not found and series_uids and not settings.worker.archive_inputs:
        log.warning("earlier rounds' instances are not archived: this round stands alone")
    return found
