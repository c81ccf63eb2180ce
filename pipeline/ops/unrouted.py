"""Inputs no routing rule took (:mod:`pipeline.core.unrouted`): the day's record, and the kept
ones sent through routing again once a rule takes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.core.jobs import Job, read_job
from pipeline.core.settings import Settings
from pipeline.core.unrouted import RECORD_FILE, kept
from pipeline.ops.failed import back_to_spool


def find(settings: Settings, item_id: str) -> Path:
    folder = settings.unrouted_dir / item_id
    if not item_id or "/" in item_id or item_id.startswith(".") or not folder.is_dir():
        raise InputError(f"no kept item {item_id!r} (see `dicom-pipeline unrouted list`)")
    return folder


def retry(settings: Settings, folder: Path, enqueue: Callable[[Job], bool]) -> str:
    """A kept item routed again (after a rule was added): back to the spool and queued."""
    job = read_job(folder)
    if (settings.spool_dir / job.id).exists():
        raise InputError(f"{folder.name}: job {job.id} is in the spool already")
    (folder / RECORD_FILE).unlink(missing_ok=True)  # a new line is recorded if none takes it
    return f"{folder.name}: " + back_to_spool(settings, folder, job, enqueue)


def retry_all(settings: Settings, enqueue: Callable[[Job], bool]) -> list[tuple[str, bool]]:
    outcomes = []
    for folder in kept(settings.unrouted_dir):
        try:
            outcomes.append((retry(settings, folder, enqueue), True))
        except (InputError, OSError, ValueError) as exc:
            outcomes.append((f"{folder.name}: {exc}", False))
    return outcomes
