"""Failed items: what is in ``data/failed/``, and retrying them after a fix.

Three kinds of item, each a folder with ``error.json``:

- a **job** (``<job id>/``, or ``<job id>.<suffix>/`` when a retried job failed again): its
  ``job.json`` and its input. Retry moves the folder back into the spool, the earlier error
  kept as ``previous-error.json``, and queues the job; if Redis cannot be reached, the watcher
  or the receiver queues it as soon as it can (they re-offer spooled jobs every few seconds and
  at start-up).
- a **send** (``<job id>.send-<destination>/``): DICOM results a destination did not take.
  Retry queues the sending of the files it names (still in results) again.
- a **pull** (``pull-<pull id>-<n>/``): a study a PACS did not send whole after the
  source's retries. What arrived is kept; `dicom-pipeline pull --resume <pull id>` asks for
  the study again.
- an **intake** refusal (a symbolic link dropped into the inbox, say, or the files of a
  dropped folder that are not images, set aside together): no job was made, so
  there is nothing to retry; put a fixed copy into the inbox.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.core.errors import InputError, PipelineError
from pipeline.core.fsutil import fsync_dir
from pipeline.core.instances import inbox_files
from pipeline.core.jobs import (
    ENQUEUED_MARKER,
    ERROR_FILE,
    JOB_FILE,
    REJECTED_OUTPUTS,
    STUDY_FOLDER,
    Job,
    read_job,
)
from pipeline.core.routing import Priority
from pipeline.core.settings import Settings
from pipeline.outputs.send.dispatch import Delivery

PREVIOUS_ERROR = "previous-error.json"
Kind = Literal["job", "send", "intake", "pull"]


@dataclass(frozen=True)
class FailedItem:
    id: str  # the folder's name
    kind: Kind
    folder: Path
    error: dict[str, Any]

    @property
    def when(self) -> str:
        return str(self.error.get("time", ""))[:19].replace("T", " ")

    @property
    def what(self) -> str:
        """The item in the user's words: the inbox name, the study, or the destination."""
        if self.kind == "send":
            return f"{len(self.error.get('files', []))} file(s) to {self.error.get('destination')}"
        job = self.error.get("job") or {}
        what = str(job.get("original_name") or self.error.get("original_name") or "")
        try:  # a study gathered from inbox files, or a folder's files set aside: say which
            files = list(
                self.error.get("files") or inbox_files(self.folder / STUDY_FOLDER).values()
            )
        except OSError:
            return what
        if not files:
            return what
        return f"{what} ({len(files)} inbox file(s): {files[0]}{', …' if len(files) > 1 else ''})"


def items(settings: Settings) -> list[FailedItem]:
    """Every failed item, oldest first (ids start with the arrival time)."""
    if not settings.failed_dir.is_dir():
        return []
    found = []
    for folder in sorted(settings.failed_dir.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue  # a folder being written
        found.append(_item(folder))
    return found


def find(settings: Settings, item_id: str) -> FailedItem:
    if not item_id or "/" in item_id or item_id.startswith("."):
        raise InputError(f"no failed item {item_id!r}")
    folder = settings.failed_dir / item_id
    if not folder.is_dir():
        raise InputError(f"no failed item {item_id!r} (see `dicom-pipeline failed list`)")
    return _item(folder)


def _item(folder: Path) -> FailedItem:
    try:
        error = json.loads((folder / ERROR_FILE).read_text())
    except (OSError, ValueError) as exc:
        error = {"type": "unknown", "message": f"error.json unreadable: {exc}", "stage": "?"}
    kind: Kind = "job"
    if ".send-" in folder.name:
        kind = "send"
    elif folder.name.startswith("pull-"):
        kind = "pull"
    elif not (folder / JOB_FILE).is_file():
        kind = "intake"
    return FailedItem(folder.name, kind, folder, error)


def retry(
    settings: Settings,
    item: FailedItem,
    enqueue: Callable[[Job], bool],
    send_again: Callable[[Delivery], None],
) -> str:
    """Retry one item; returns what happened, in words. PipelineError when it cannot be."""
    if item.kind == "pull" and item.error.get("type") == "NoMatch":
        raise InputError(f"{item.id}: {item.error.get('message')}; nothing was retrieved")
    if item.kind == "pull":
        pull_id = (item.error.get("job") or {}).get("pull", "?")
        raise InputError(
            f"{item.id}: a study the PACS did not send whole ({item.error.get('message')}); "
            f"what arrived is kept: `dicom-pipeline pull --resume {pull_id}` asks for it again"
        )
    if item.kind == "intake":
        raise InputError(
            f"{item.id} was refused at intake ({item.error.get('message')}); nothing to retry: "
            "put a fixed copy into the inbox"
        )
    if item.kind == "send":
        urgent = item.error.get("priority") == Priority.URGENT  # sent ahead again
        delivery = Delivery(
            job_id=str((item.error.get("job") or {}).get("id", "")),
            destination=str(item.error.get("destination", "")),
            files=list(item.error.get("files", [])),
            priority=Priority.URGENT if urgent else Priority.ROUTINE,
        )
        send_again(delivery)  # raises TransientError when the broker cannot be reached
        shutil.rmtree(item.folder)
        return f"{item.id}: sending of {len(delivery.files)} file(s) queued"
    job = read_job(item.folder)
    if (settings.spool_dir / job.id).exists():
        raise InputError(f"{item.id}: job {job.id} is in the spool already (being processed)")
    os.replace(item.folder / ERROR_FILE, item.folder / PREVIOUS_ERROR)
    shutil.rmtree(item.folder / REJECTED_OUTPUTS, ignore_errors=True)
    return f"{item.id}: " + back_to_spool(settings, item.folder, job, enqueue)


def back_to_spool(
    settings: Settings, folder: Path, job: Job, enqueue: Callable[[Job], bool]
) -> str:
    """A set-aside job's folder (failed, or kept as no rule took it) moved back into the
    spool and queued; what happened, in words."""
    (folder / ENQUEUED_MARKER).unlink(missing_ok=True)
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    parent = folder.parent
    os.replace(folder, settings.spool_dir / job.id)  # same file system: atomic
    fsync_dir(settings.spool_dir)
    fsync_dir(parent)
    if enqueue(job):
        return f"job {job.id} queued again"
    return f"job {job.id} back in the spool; queued once Redis is reachable"


def retry_all(
    settings: Settings,
    enqueue: Callable[[Job], bool],
    send_again: Callable[[Delivery], None],
) -> list[tuple[FailedItem, str, bool]]:
    """Every retryable item; (item, what happened, ok) for each."""
    outcomes = []
    for item in items(settings):
        if item.kind == "intake":
            continue
        try:
            outcomes.append((item, retry(settings, item, enqueue, send_again), True))
        except PipelineError as exc:
            outcomes.append((item, str(exc), False))
    return outcomes
