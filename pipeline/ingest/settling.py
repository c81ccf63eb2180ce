"""The inbox watcher's bookkeeping over a clock, no threads and no I/O but ``lstat``: when a
dropped file is complete, and when files dropped together (a study's, a folder's) are."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline.core.filekinds import DICOMDIR
from pipeline.core.jobs import now

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

    def pending(self) -> list[Path]:
        """Paths seen but not yet stable: files still being written, or just written."""
        return list(self._seen)

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


@dataclass(frozen=True)
class Patience:
    """When files dropped together are complete, there being no association to release:
    once none has come for ``quiet_s`` and no file is still being written (or settling) in
    the inbox folders they came in (a folder copied in takes as long as it takes); files
    written there meanwhile hold them back for ``pending_max_s`` at most (a standing drop
    folder with steady traffic is never free of them); and ``max_wait_s`` after the first."""

    quiet_s: float
    pending_max_s: float
    max_wait_s: float

    def done(self, t: float, first: float, last: float, pending: bool) -> bool:
        quiet = t - last
        if quiet >= self.quiet_s and (not pending or quiet >= self.pending_max_s):
            return True
        return t - first >= self.max_wait_s


class SettlingStudies:
    """DICOM studies being gathered from the inbox, complete by :class:`Patience`. Pure
    bookkeeping over a clock."""

    def __init__(self, patience: Patience, clock: Clock = time.monotonic) -> None:
        self.patience = patience
        self.clock = clock
        # study UID -> (first taken, last taken, when received, top-level inbox entries)
        self._studies: dict[str, tuple[float, float, datetime, set[str]]] = {}

    def __contains__(self, study_uid: object) -> bool:
        return study_uid in self._studies

    def __len__(self) -> int:
        return len(self._studies)

    def taken(self, study_uid: str, entry: str) -> None:
        """A file of the study was placed; ``entry`` is the inbox entry it was dropped in."""
        t = self.clock()
        first, _, received, entries = self._studies.get(study_uid, (t, t, now(), set()))
        self._studies[study_uid] = (first, t, received, entries | {entry})

    def adopt(self, study_uid: str) -> None:
        """A study left in the spool by an earlier run: its timer starts now."""
        if study_uid not in self._studies:
            t = self.clock()
            self._studies[study_uid] = (t, t, now(), set())

    def due(self, pending_entries: set[str]) -> list[tuple[str, datetime]]:
        """Studies complete now, with when their first file was taken; forgotten here."""
        t = self.clock()
        done = []
        for uid, (first, last, received, entries) in list(self._studies.items()):
            if self.patience.done(t, first, last, bool(entries & pending_entries)):
                del self._studies[uid]
                done.append((uid, received))
        return done


class HeldFiles:
    """Files of dropped folders held per top-level inbox entry until its files are complete
    by :class:`Patience`: the files that are not images, and on a DICOM medium its other
    files too. Pure bookkeeping over a clock."""

    def __init__(self, patience: Patience, clock: Clock = time.monotonic) -> None:
        self.patience = patience
        self.clock = clock
        self._entries: dict[str, tuple[float, float, set[Path]]] = {}  # first, last, files
        self._media: set[str] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> set[str]:
        return set(self._entries)

    def has_dicomdir(self, entry: str) -> bool:
        """Whether a file named DICOMDIR is held for ``entry``."""
        return entry in self._media

    def hold(self, entry: str, path: Path) -> None:
        t = self.clock()
        first, _, paths = self._entries.get(entry, (t, t, set()))
        paths.add(path)
        self._entries[entry] = (first, t, paths)
        if path.name.upper() == DICOMDIR:
            self._media.add(entry)

    def due(self, pending_entries: set[str]) -> list[tuple[str, list[Path]]]:
        """Entries settled now, with their held files (sorted); forgotten here."""
        t = self.clock()
        done = []
        for entry, (first, last, paths) in list(self._entries.items()):
            if self.patience.done(t, first, last, entry in pending_entries):
                del self._entries[entry]
                self._media.discard(entry)
                done.append((entry, sorted(paths)))
        return done
