"""The inbox watcher: files dropped into the inbox become spooled, queued jobs.

A file is taken only once it is stable: no filesystem event and no change of size or mtime
for ``settle_seconds`` (copies over SMB or scp arrive in pieces). Names of files still being
written (``*.part``, dot-files, ...) are never taken. Taken files move atomically into the
spool, and the job is queued; if Redis is down the job waits in the spool and is queued when
Redis is back. Files already in the inbox at start-up are taken too.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_json, move_into
from pipeline.jobs import Job, error_record, new_job_id, now, requeue_pending, spool_file
from pipeline.settings import Settings

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class StabilityTracker:
    """Which candidate paths have been quiet long enough. Pure bookkeeping, no threads."""

    def __init__(self, settle_seconds: float, clock: Clock = time.monotonic) -> None:
        self.settle = settle_seconds
        self.clock = clock
        # path -> (size, mtime_ns, time of the last change or event)
        self._seen: dict[Path, tuple[int, int, float]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def touch(self, path: Path) -> None:
        """An event for ``path``: (re)start its quiet period."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            self._seen.pop(path, None)
            return
        self._seen[path] = (st.st_size, st.st_mtime_ns, self.clock())

    def stable(self) -> list[Path]:
        """Paths unchanged for the settle time; they are forgotten once returned."""
        t = self.clock()
        ready: list[Path] = []
        for path, (size, mtime, since) in list(self._seen.items()):
            try:
                st = path.lstat()
            except FileNotFoundError:
                del self._seen[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                self._seen[path] = (st.st_size, st.st_mtime_ns, t)
            elif t - since >= self.settle:
                del self._seen[path]
                ready.append(path)
        return ready


def ignored(path: Path, inbox: Path, patterns: Iterable[str]) -> bool:
    """Files being written (by name) and anything inside hidden folders are not taken."""
    rel = path.relative_to(inbox)
    if any(part.startswith(".") for part in rel.parts[:-1]):
        return True
    return any(fnmatch.fnmatch(rel.name, p) for p in patterns)


class _Events(FileSystemEventHandler):
    def __init__(self, sink: queue.SimpleQueue[Path]) -> None:
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in {"created", "modified", "closed", "moved"}:
            target = getattr(event, "dest_path", "") or event.src_path
            self.sink.put(Path(os.fsdecode(target)))


class InboxWatcher:
    """Runs in one thread until ``stop`` is set; hands jobs to ``enqueue``."""

    RESCAN_S = 30.0  # safety net for events lost by the OS (e.g. on network filesystems)
    REQUEUE_S = 5.0  # how often spooled-but-unqueued jobs are offered to the broker again

    def __init__(self, settings: Settings, enqueue: Callable[[Job], bool]) -> None:
        self.settings = settings
        self.inbox = settings.inbox_dir.resolve()
        self.enqueue = enqueue
        self.tracker = StabilityTracker(settings.inbox.settle_seconds)
        self.events: queue.SimpleQueue[Path] = queue.SimpleQueue()

    def run(self, stop: threading.Event) -> None:
        self.settings.ensure_dirs()
        observer = Observer()
        observer.schedule(_Events(self.events), str(self.inbox), recursive=True)
        observer.start()
        try:
            self._requeue()
            self._scan()
            last_scan = last_requeue = time.monotonic()
            while not stop.is_set():
                self._drain()
                for path in self.tracker.stable():
                    self._take(path)
                t = time.monotonic()
                if t - last_scan >= self.RESCAN_S:
                    self._scan()
                    last_scan = t
                if t - last_requeue >= self.REQUEUE_S:
                    self._requeue()
                    last_requeue = t
                stop.wait(self.settings.inbox.poll_interval_s)
        finally:
            observer.stop()
            observer.join(timeout=5)

    def _drain(self) -> None:
        while True:
            try:
                path = self.events.get_nowait()
            except queue.Empty:
                return
            if path.is_dir() and not path.is_symlink():
                self._scan(path)
            elif path != self.inbox and path.is_relative_to(self.inbox):
                self.tracker.touch(path)

    def _scan(self, root: Path | None = None) -> None:
        for dirpath, dirnames, filenames in os.walk(root or self.inbox):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                self.tracker.touch(Path(dirpath) / name)
            # A symlink to a folder is listed as a folder name and is not followed: take it
            # as a file so it is reported, not silently skipped.
            for name in list(dirnames):
                if (Path(dirpath) / name).is_symlink():
                    dirnames.remove(name)
                    self.tracker.touch(Path(dirpath) / name)

    def _take(self, path: Path) -> None:
        if ignored(path, self.inbox, self.settings.inbox.ignore_patterns):
            return
        if path.is_symlink():
            self._reject(
                path,
                InputError("symbolic links are not accepted in the inbox; copy the file itself"),
            )
            return
        if not path.is_file():
            return
        try:
            job = spool_file(path, self.inbox, self.settings.spool_dir)
        except FileNotFoundError:
            return  # moved away meanwhile by its owner
        log.info(
            "inbox: took job %s (%d bytes)",
            job.id,
            (self.settings.spool_dir / job.id / job.input_file).stat().st_size,
        )
        self.enqueue(job)

    def _reject(self, path: Path, error: InputError) -> None:
        """Refused at intake: moved to failed/ with the reason, never left or dropped."""
        job_id = new_job_id()
        folder = self.settings.failed_dir / f".{job_id}"
        folder.mkdir(parents=True)
        move_into(path, folder)
        record = error_record(error, "intake")
        record["original_name"] = str(path.relative_to(self.inbox))
        record["received_at"] = now().isoformat()
        atomic_write_json(folder / "error.json", record)
        os.replace(folder, self.settings.failed_dir / job_id)
        log.error("inbox: rejected item as failed/%s: %s", job_id, error)

    def _requeue(self) -> None:
        requeue_pending(self.enqueue, self.settings.spool_dir)
