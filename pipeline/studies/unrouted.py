"""A job no routing rule takes anything of, set aside as the ``unrouted`` setting says
(:mod:`pipeline.core.unrouted`): recorded, then archived or removed (ignore), kept (keep), or
failed (fail)."""

from __future__ import annotations

import logging

from pipeline.core import observe
from pipeline.core.errors import NoModelError
from pipeline.core.fsutil import atomic_write_json, move_into
from pipeline.core.jobs import ENQUEUED_MARKER, PROCESSING_MARKER, Job, job_dir, now
from pipeline.core.settings import Settings
from pipeline.core.unrouted import RECORD_FILE, Entry, Item, record
from pipeline.studies.steps import StageError, finish_job

log = logging.getLogger(__name__)


def set_aside(job: Job, settings: Settings, items: list[Item]) -> None:
    """Record the job and do what the policy says; StageError (NoModelError) for ``fail``."""
    policy = settings.unrouted
    reasons = "; ".join(f"{i.what}: {i.reason}" for i in items)
    if policy == "fail":
        _count(policy, items)
        raise StageError("route", NoModelError(f"nothing to process: {reasons or 'no image'}"))
    study = job.study.study_uid if job.study else None
    entry = Entry(
        time=now(),
        job=job.id,
        source=job.source,
        study=study,
        name=None if study else job.original_name,
        policy=policy,
        items=items,
    )
    record(settings.unrouted_dir, entry)
    folder = job_dir(settings.spool_dir, job.id)
    if policy == "keep":
        atomic_write_json(folder / RECORD_FILE, entry.model_dump(mode="json"))
        (folder / ENQUEUED_MARKER).unlink(missing_ok=True)
        (folder / PROCESSING_MARKER).unlink(missing_ok=True)
        move_into(folder, settings.unrouted_dir)
    else:
        finish_job(folder, settings)
    _count(policy, items)
    observe.stage(
        "unrouted",
        job=job.id,
        study=study or "",
        policy=policy,
        items=len(items),
        modalities=",".join(entry.modalities),
    )


def _count(policy: str, items: list[Item]) -> None:
    for i in items:
        observe.count("unrouted", policy, i.kind, i.modality, i.sop_class)
