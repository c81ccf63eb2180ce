"""Jobs: one unit of work, spooled on disk before it is queued, so nothing is lost.

``data/spool/<id>/`` holds the input (a file from the inbox, or ``study/`` for a DICOM study
from the receiver) and ``job.json``; ``.enqueued`` marks that the
Celery message was accepted by Redis. A job without that marker is (re-)enqueued by the
watcher, at start-up and whenever Redis comes back. The task message is the job as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_json, fsync_dir, move_into
from pipeline.core.instances import InvalidUIDError, check_uid
from pipeline.core.routing import Priority

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
ENQUEUED_MARKER = ".enqueued"
PROCESSING_MARKER = ".processing"  # a worker has taken the job (status pages read it)
ERROR_FILE = "error.json"
REJECTED_OUTPUTS = "invalid-output"  # DICOM outputs that failed validation, kept for failed/
_JOB_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")


def now() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    """Sortable by arrival time, unique, and safe as a path part."""
    return f"{now():%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise InputError(f"invalid job id {job_id!r}")
    return job_id


STUDY_FOLDER = "study"


class Reason(StrEnum):
    """Why a study was taken as complete (:mod:`pipeline.ingest.completion`): its
    ``completed_by``."""

    RELEASED = "association-released"
    MPPS = "mpps-completed"
    QUIET = "quiet-period"
    MAX_WAIT = "max-wait"
    INBOX = "inbox-settled"  # DICOM files dropped into the inbox (pipeline.ingest.inbox)
    PULLED = "retrieved"  # pulled from a PACS, every instance it counted here (ingest.pull)
    RERUN = "rerun"  # processed again from its archived inputs (`dicom-pipeline rerun`)


class StudyRef(BaseModel):
    """What the receiver knows of a DICOM study when it hands it over."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_uid: str
    series: dict[str, int] = Field(description="SeriesInstanceUID -> number of instances.")
    instances: int
    calling_aet: str | None = Field(description="Who sent it (last association).")
    called_aet: str | None = Field(description="The AE title the sender addressed.")
    completed_by: str = Field(
        description="association-released, mpps-completed, quiet-period, max-wait, "
        "inbox-settled for DICOM files dropped into the inbox, retrieved for a study "
        "pulled from a PACS (`dicom-pipeline pull`; calling_aet is then the PACS's), or rerun "
        "for one processed again from its archived inputs (`dicom-pipeline rerun`)."
    )
    hold_until: datetime | None = Field(
        default=None,
        description="Handed over at the association's release, before the grace period ended: "
        "processing starts at once, results are written only from this time on, and only if "
        "no further instance of the study arrived by then (see pipeline.studies.study_job).",
    )

    @field_validator("study_uid")
    @classmethod
    def _a_uid(cls, v: str) -> str:
        """The worker makes paths of it (results, spool): a forged message must not escape."""
        try:
            return check_uid(v, "study_uid")
        except InvalidUIDError as exc:
            raise ValueError(str(exc)) from None


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    source: Literal["inbox", "dicom"]
    original_name: str = Field(
        description="Inbox: path relative to the inbox, as dropped. DICOM: the study UID."
    )
    input_file: str = Field(
        description="Name inside the job's spool folder: the file, or study/ holding "
        "<SeriesInstanceUID>/<SOPInstanceUID>.dcm."
    )
    received_at: datetime
    queued_at: datetime | None = None
    # Never written to job.json nor sent in the task message (a worker or a watcher of the
    # previous version, which forbids unknown keys, would refuse them during an upgrade): the
    # worker sets it from the queue it took the job from.
    priority: Priority | None = Field(default=None, exclude=True)
    study: StudyRef | None = None

    @model_validator(mode="after")
    def _study_for_dicom(self) -> Job:
        if (self.source == "dicom") != (self.study is not None):
            raise ValueError("a DICOM job carries its study, an inbox job none")
        return self

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        return check_job_id(v)

    @field_validator("input_file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or v in {".", ".."} or "/" in v or "\0" in v:
            raise ValueError(f"invalid input file name {v!r}")
        return v


def is_job_id(name: str) -> bool:
    return _JOB_ID.fullmatch(name) is not None


def job_dir(spool: Path, job_id: str) -> Path:
    return spool / check_job_id(job_id)


def spool_file(path: Path, inbox: Path, spool: Path) -> Job:
    """Move an inbox file atomically into a new job folder; the job exists once job.json does."""
    job = Job(
        id=new_job_id(),
        source="inbox",
        original_name=str(path.relative_to(inbox)),
        input_file=path.name,
        received_at=now(),
    )
    # Built under a dot-name and renamed: a half-made job folder is never seen as a job.
    staging = spool / f".{job.id}"
    staging.mkdir(parents=True)
    move_into(path, staging)
    atomic_write_json(staging / JOB_FILE, job.model_dump(mode="json"))
    os.replace(staging, spool / job.id)
    fsync_dir(spool)
    return job


def recover_staging(spool: Path, inbox: Path) -> None:
    """Finish or undo job folders a crash left half-made (``spool/.<id>/``).

    With job.json and its input inside, the job was complete: it is promoted. Without
    job.json, any file in it came from the inbox and goes back there. A job.json without its
    input belongs to a study that was never moved: the study folder is still in the spool.
    """
    if not spool.is_dir():
        return
    for staging in spool.iterdir():
        if not staging.name.startswith(".") or not is_job_id(staging.name[1:]):
            continue
        try:
            job = read_job(staging)
        except (OSError, ValueError):
            job = None
        if job is not None and (staging / job.input_file).exists():
            os.replace(staging, spool / job.id)
            log.warning("recovered half-made job %s", job.id)
        else:
            for item in staging.iterdir():
                if item.name != JOB_FILE:
                    move_into(item, inbox)
                    log.warning("returned an unspooled inbox file to the inbox")
            (staging / JOB_FILE).unlink(missing_ok=True)
            staging.rmdir()
    fsync_dir(spool)


def read_job(folder: Path) -> Job:
    return Job.model_validate_json((folder / JOB_FILE).read_text())


def mark_enqueued(spool: Path, job_id: str, lane: str = "") -> None:
    """The marker holds the name of the lane the job waits in (status pages show it)."""
    folder = job_dir(spool, job_id)
    try:
        # No mkdir: if a worker already finished and moved the folder away, there is nothing
        # left to mark, and recreating it would resurrect a finished job.
        with (folder / ENQUEUED_MARKER).open("x") as marker:
            marker.write(lane)
    except (FileNotFoundError, FileExistsError):
        pass


def queued_lane(folder: Path) -> str | None:
    """The lane a queued job waits in ("" for a marker written before lanes); None if the job
    is not queued."""
    try:
        return (folder / ENQUEUED_MARKER).read_text(errors="replace").strip()
    except OSError:
        return None


def pending_jobs(spool: Path) -> Iterator[Job]:
    """Spooled jobs whose task was never accepted by the broker, oldest first."""
    if not spool.is_dir():
        return
    for folder in sorted(spool.iterdir()):
        if not _JOB_ID.fullmatch(folder.name) or (folder / ENQUEUED_MARKER).exists():
            continue
        try:
            yield read_job(folder)
        except (OSError, ValueError) as exc:
            log.warning("spool folder %s has no readable job.json: %s", folder.name, exc)


def taken_jobs(spool: Path) -> Iterator[Job]:
    """Spooled jobs a worker has taken (``.processing``), oldest first."""
    if not spool.is_dir():
        return
    for folder in sorted(spool.iterdir()):
        if _JOB_ID.fullmatch(folder.name) and (folder / PROCESSING_MARKER).exists():
            try:
                yield read_job(folder)
            except (OSError, ValueError):
                continue  # gone (done) while we looked


def requeue_pending(enqueue_job: Callable[[Job], bool], spool: Path) -> None:
    """Offer every spooled, never-queued job to the broker, oldest first."""
    for job in pending_jobs(spool):
        if not enqueue_job(job):
            return  # broker still down; the caller tries again later


def quarantine(folder: Path, failed: Path, error: dict[str, object]) -> Path:
    """Move a job folder (input kept whole) to ``failed/`` with its ``error.json``."""
    atomic_write_json(folder / ERROR_FILE, error)
    (folder / ENQUEUED_MARKER).unlink(missing_ok=True)
    (folder / PROCESSING_MARKER).unlink(missing_ok=True)
    dest = failed / folder.name
    if dest.exists():  # a second failure of a retried job: keep the newest, never mix two
        dest = failed / f"{folder.name}.{secrets.token_hex(2)}"
        folder = folder.rename(folder.with_name(dest.name))
    return move_into(folder, failed)


def error_record(exc: BaseException, stage: str, job: Job | None = None) -> dict[str, object]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "stage": stage,
        "time": now().isoformat(),
        "job": json.loads(job.model_dump_json()) if job else None,
    }
