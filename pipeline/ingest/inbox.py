"""The inbox watcher: files dropped into the inbox become spooled, queued jobs.

A file is taken only once it is stable: no filesystem event and no change of size or mtime
for ``settle_seconds`` (copies over SMB or scp arrive in pieces). Names of files still being
written (``*.part``, dot-files, ...) are never taken. Taken files move atomically into the
spool, and the job is queued; if Redis is down the job waits in the spool and is queued when
Redis is back. Files already in the inbox at start-up are taken too.

DICOM files are not jobs of their own: each goes into its study's folder in the spool, where
the receiver puts received instances, and the study becomes one job once it has settled
(:class:`SettlingStudies`). A CT series copied from a CD is then one volume, routed and
processed exactly as if a PACS had sent it, instead of a pile of single images.

In a dropped folder, files the pipeline does not read wait until the folder has settled
(:class:`HeldFiles`), and so do images on a DICOM medium (a DICOMDIR in or above their
folder: a CD, a USB stick). A medium's images are its DICOM files; the rest (the DICOMDIR, a
README, a viewer program with its icons) is set aside together as one failed item, kept and
listed, instead of one failed job per file. Elsewhere an image is a job at once, and the
files of a type the pipeline cannot read are set aside together in the same way. A zip is
unpacked into a folder beside it (:mod:`pipeline.ingest.unpack`), then taken as a dropped folder.
Unpacking runs on a thread of its own, one archive at a time: a CD's worth of zip does not
hold up the files dropped beside it, nor the closing of studies.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from pipeline.core.errors import InputError
from pipeline.core.filekinds import DICOMDIR, kind_of, medium_extras
from pipeline.core.instances import (
    INBOX_FILES,
    InstanceUIDs,
    Placed,
    file_identity,
    free_bytes,
    place_file,
)
from pipeline.core.jobs import (
    Reason,
    spool_file,
)
from pipeline.core.settings import Settings
from pipeline.ingest import unpack
from pipeline.ingest.completion import Completed, spooled_studies
from pipeline.ingest.handover import Producer
from pipeline.ingest.intake_failures import IntakeFailures
from pipeline.ingest.settling import HeldFiles, Patience, SettlingStudies, StabilityTracker

log = logging.getLogger(__name__)

# Second copies of an instance taken once, as the log says them when their study closes.
_SECOND_COPIES = {
    Placed.SAME: "byte for byte the same",
    Placed.RECODED: "the same instance in another encoding (transfer syntax)",
}


def ignored(path: Path, inbox: Path, patterns: Iterable[str]) -> bool:
    """Files being written (by name), anything inside hidden folders and the marker of an
    unpacked folder (whatever the patterns say) are not taken."""
    return (
        path.name == unpack.MARKER
        or in_hidden_folder(path, inbox)
        or any(fnmatch.fnmatch(path.name, p) for p in patterns)
    )


def in_hidden_folder(path: Path, inbox: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(inbox).parts[:-1])


class _Events(FileSystemEventHandler):
    def __init__(self, inbox: Path, sink: queue.SimpleQueue[Path]) -> None:
        self.inbox = inbox
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in {"created", "modified", "closed", "moved"}:
            path = Path(os.fsdecode(getattr(event, "dest_path", "") or event.src_path))
            # Not even looked at: files written in hidden folders (an archive being unpacked
            # is thousands of them, whose events would slow its unpacking down 3 times).
            if path.is_relative_to(self.inbox) and not in_hidden_folder(path, self.inbox):
                self.sink.put(path)


class InboxWatcher:
    """Runs in one thread until ``stop`` is set; hands jobs to ``producer``."""

    RESCAN_S = 30.0  # safety net for events lost by the OS (e.g. on network filesystems)
    REQUEUE_S = 5.0  # how often spooled-but-unqueued jobs are offered to the broker again

    def __init__(self, settings: Settings, producer: Producer) -> None:
        self.settings = settings
        self.inbox = settings.inbox_dir.resolve()
        self.producer = producer
        self.failures = IntakeFailures(settings.failed_dir, self.inbox)
        self.tracker = StabilityTracker(settings.inbox.settle_seconds)
        patience = Patience(
            settings.inbox.study_quiet_s,
            max(settings.inbox.study_quiet_s, settings.receiver.quiet_period_s),
            settings.receiver.max_wait_s,
        )
        self.studies = SettlingStudies(patience)
        self.held = HeldFiles(patience)
        # (study UID, SAME or RECODED) -> second copies removed
        self.copies: Counter[tuple[str, Placed]] = Counter()
        self.unpacked: set[Path] = set()  # folders made by unpacking: removed once emptied
        self.unpacking: dict[Path, Future[Path | None]] = {}  # archive -> its unpacked folder
        self.stop_unpacking = threading.Event()
        # Its thread starts with the first archive.
        self.unpacker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inbox-unpack")
        self.events: queue.SimpleQueue[Path] = queue.SimpleQueue()

    def run(self, stop: threading.Event) -> None:
        self.settings.ensure_dirs()
        observer = Observer()
        observer.schedule(_Events(self.inbox, self.events), str(self.inbox), recursive=True)
        observer.start()
        try:
            self._adopt()
            self._requeue()
            self._scan()
            last_scan = last_requeue = time.monotonic()
            while not stop.is_set():
                self._drain()
                self._collect_unpacked()
                for path in self.tracker.stable():
                    try:
                        self._take(path)
                    except Exception as exc:  # noqa: BLE001 - one file must not stop the inbox
                        log.error(
                            "inbox: a file could not be taken (%s); it is tried again at the "
                            "next scan",
                            type(exc).__name__,  # not its words: they may hold the path
                        )
                if self.studies or self.held or self.unpacked:
                    # Top-level entries with a file still being written, settling or unpacked.
                    busy = {
                        p.relative_to(self.inbox).parts[0]
                        for p in (*self.tracker.pending(), *self.unpacking)
                    }
                    self._close_settled(busy)
                    self._release_held(busy)
                    self._tidy_unpacked(busy)
                t = time.monotonic()
                if t - last_scan >= self.RESCAN_S:
                    self._scan()
                    last_scan = t
                if t - last_requeue >= self.REQUEUE_S:
                    self._requeue()
                    last_requeue = t
                stop.wait(self.settings.inbox.poll_interval_s)
        finally:
            self.stop_unpacking.set()  # the archive being unpacked waits for the next start
            self.unpacker.shutdown(wait=True, cancel_futures=True)
            observer.stop()
            observer.join(timeout=5)

    def _drain(self) -> None:
        while True:
            try:
                path = self.events.get_nowait()
            except queue.Empty:
                return
            if path.is_dir() and not path.is_symlink():
                if not path.name.startswith("."):  # a hidden one: an archive being unpacked
                    self._scan(path)
            elif path != self.inbox:
                self.tracker.touch(path)

    def _scan(self, root: Path | None = None) -> None:
        for dirpath, dirnames, filenames in os.walk(root or self.inbox):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if unpack.MARKER in filenames and Path(dirpath).parent == self.inbox:
                self.unpacked.add(Path(dirpath))  # unpacked before this watcher started
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
        if self.settings.inbox.unpack_zip and unpack.is_archive(path):
            if path not in self.unpacking:  # else offered again by a scan while unpacked
                self.unpacking[path] = self.unpacker.submit(self._unpack, path)
            return
        if (uids := file_identity(path)) is not None:
            self._take_instance(path, uids)
            return
        rel = path.relative_to(self.inbox)
        # In a dropped folder, what is no image waits to be set aside with its fellows; on a
        # DICOM medium, so do images (a viewer's icons), to be set aside with the medium.
        if len(rel.parts) > 1 and (kind_of(path) is None or self._on_medium(path, rel.parts[0])):
            self.held.hold(rel.parts[0], path)
            return
        self._spool(path)

    def _on_medium(self, path: Path, entry: str) -> bool:
        """A DICOMDIR in the file's folder or above it, up to the entry, or held for it (an
        image copied before the DICOMDIR is not known to be on a medium: it is a job)."""
        if self.held.has_dicomdir(entry):
            return True
        top = self.inbox / entry
        folders = [path.parent, *(p for p in path.parent.parents if p.is_relative_to(top))]
        return any((f / name).is_file() for f in folders for name in (DICOMDIR, "dicomdir"))

    def _spool(self, path: Path) -> None:
        """A job of its own."""
        try:
            job = spool_file(path, self.inbox, self.settings.spool_dir)
        except FileNotFoundError:
            return  # moved away meanwhile by its owner
        log.info(
            "inbox: took job %s (%d bytes)",
            job.id,
            (self.settings.spool_dir / job.id / job.input_file).stat().st_size,
        )
        self.producer.enqueue(job)

    def _take_instance(self, path: Path, uids: InstanceUIDs) -> None:
        """Into its study folder in the spool; the study is queued once it has settled."""
        rel = path.relative_to(self.inbox)
        note = json.dumps({"series": uids.series, "sop": uids.sop, "file": str(rel)})
        try:
            placed = place_file(self.settings.spool_dir, uids, path, note)
        except FileNotFoundError:
            return  # moved away meanwhile by its owner
        except OSError as exc:  # left in the inbox: taken again at the next scan
            log.error("inbox: could not spool a DICOM file: %s", _said(exc))
            return
        if placed is Placed.CONFLICT:
            self._reject(
                path,
                InputError(
                    f"SOP instance {uids.sop} is already among the files gathered for study "
                    f"{uids.study}, with other content; this copy was not used"
                ),
            )
            return
        if placed in (Placed.SAME, Placed.RECODED):  # a CD copied again, an export redone
            self.copies[(uids.study, placed)] += 1  # said once, when the study closes
        elif uids.study not in self.studies:  # UIDs only: folder names may carry a patient's name
            log.info("inbox: gathering the DICOM files of study %s", uids.study)
        self.studies.taken(uids.study, rel.parts[0])

    def _close_settled(self, busy: set[str]) -> None:
        for study_uid, received in self.studies.due(busy):
            for placed, how in _SECOND_COPIES.items():
                if copies := self.copies.pop((study_uid, placed), 0):
                    log.info(
                        "inbox: study %s: %d instance(s) came twice, %s; the second copies were "
                        "removed",
                        study_uid,
                        copies,
                        how,
                    )
            # None if closed meanwhile by the receiver, which adopts spooled studies.
            try:
                self.producer.close(Completed(study_uid, Reason.INBOX, received, None, None))
            except OSError as exc:  # left in the spool: adopted again at the next start
                log.error("inbox: study %s could not be closed: %s", study_uid, exc)

    def _unpack(self, path: Path) -> Path | None:
        """On the unpacking thread: a zip becomes a folder beside it (returned), which the
        watcher then takes; None if it was refused or waits in the inbox."""
        limit = self.settings.inbox.max_unpacked_mb * 2**20
        try:
            with unpack.open_archive(path) as archive:
                todo = unpack.plan(archive, limit)
                room = free_bytes(path.parent) - self.settings.receiver.min_free_disk_mb * 2**20
                if todo.size > room:  # not the archive's fault: it waits, as the receiver does
                    log.warning(
                        "inbox: an archive of %d MB waits for free space to be unpacked",
                        todo.size // 2**20,
                    )
                    return None
                folder = unpack.unpack(path, archive, todo, self.stop_unpacking)
        except unpack.ArchiveError as exc:
            self._reject(path, exc, member=exc.member)
            return None
        except unpack.CancelledError:
            log.info("inbox: stopped while unpacking an archive; it is unpacked at the next start")
            return None
        except FileNotFoundError:
            return None  # moved away meanwhile by its owner
        except OSError as exc:  # left in the inbox: tried again at the next scan
            log.error("inbox: could not unpack an archive: %s", _said(exc))
            return None
        log.info(
            "inbox: unpacked an archive into a folder of %d file(s)%s",
            len(todo.members),
            f" ({todo.skipped} macOS metadata file(s) left out)" if todo.skipped else "",
        )
        return folder

    def _collect_unpacked(self) -> None:
        """Folders unpacking has made are taken as dropped folders."""
        for path, future in list(self.unpacking.items()):
            if not future.done():
                continue
            del self.unpacking[path]
            try:
                folder = future.result()
            except Exception as exc:  # noqa: BLE001 - one archive must not stop the inbox
                log.error(
                    "inbox: an archive could not be unpacked (%s); it is tried again at the "
                    "next scan",
                    type(exc).__name__,  # not its words: they may hold the path
                )
                continue
            if folder is not None:
                self._scan(folder)  # its events may come before or after: taking twice is fine
                self.unpacked.add(folder)

    def _tidy_unpacked(self, busy: set[str]) -> None:
        """A folder the watcher made by unpacking goes once every file in it is taken (a
        folder someone dropped stays: it may be where their export tool writes)."""
        for folder in list(self.unpacked):
            if folder.relative_to(self.inbox).parts[0] in busy | self.held.entries():
                continue  # files still to be taken, or held to be set aside
            self.unpacked.discard(folder)
            for dirpath, _, filenames in os.walk(folder, topdown=False):
                here = Path(dirpath)
                if here == folder and filenames == [unpack.MARKER]:
                    (here / unpack.MARKER).unlink(missing_ok=True)
                elif filenames:
                    break  # files of names never taken (*.part, say): left for the user
                try:
                    here.rmdir()
                except OSError:
                    break  # something came meanwhile

    def _release_held(self, busy: set[str]) -> None:
        for entry, paths in self.held.due(busy):
            paths = [p for p in paths if p.is_file()]  # not moved away meanwhile by its owner
            # On a medium a DICOM file that is no instance (bad UIDs) still fails by itself,
            # with its reason.
            extras = medium_extras(paths)
            medium = bool(extras)  # the medium's own files: it has a DICOMDIR
            aside = extras or [p for p in paths if kind_of(p) is None]
            for path in paths:
                if path not in aside:
                    self._spool(path)
            if not aside:
                continue
            try:
                self._set_aside(entry, aside, medium)
            except OSError as exc:  # what is left in the inbox is taken again at the next scan
                log.error(
                    "inbox: could not set aside the files of a dropped folder: %s", _said(exc)
                )

    def _set_aside(self, entry: str, paths: list[Path], medium: bool) -> None:
        if (job_id := self.failures.set_aside(entry, paths, medium)) is None:
            return
        # Counts only: file and folder names may carry a patient's name.
        log.warning(
            "inbox: set aside %d file(s) of a dropped folder that are not images as failed/%s%s",
            len(paths),
            job_id,
            " (a DICOM medium's DICOMDIR and other files)" if medium else "",
        )

    def _adopt(self) -> None:
        """Studies an earlier run left gathering in the spool (those with inbox files)."""
        for study_uid, _ in spooled_studies(self.settings.spool_dir):
            if (self.settings.spool_dir / study_uid / INBOX_FILES).exists():
                self.studies.adopt(study_uid)

    def _reject(self, path: Path, error: InputError, member: str | None = None) -> None:
        if job_id := self.failures.reject(path, error, member):
            log.error("inbox: rejected item as failed/%s: %s", job_id, error)

    def _requeue(self) -> None:
        self.producer.requeue_pending()


def _said(exc: OSError) -> str:
    """An OS error without its paths: an inbox path may carry a patient's name."""
    return exc.strerror or type(exc).__name__
