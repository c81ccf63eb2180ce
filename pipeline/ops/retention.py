"""Retention: finished items older than the configured days are removed
(docs/operations/retention.md).

Only finished things are pruned: processed inputs (archive/), results, failed items, MPPS
records of finished procedures, and the records and kept inputs of what no rule took
(unrouted/). The spool (studies being received, jobs queued or running) is never touched.
An item's age is that of its newest file, so a study that got a later round, or a failed
item just retried and failed again, counts from then. Each item is first renamed to a
dot-name (which every reader skips), then deleted: a crash half-way leaves nothing that
looks like a whole item, and the next run finishes the deletion.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.settings import Settings
from pipeline.ingest.mpps import MPPS_DIR

log = logging.getLogger(__name__)

DAY_S = 86400.0
_DOOMED = ".pruning-"


@dataclass(frozen=True)
class Pruned:
    area: str  # archive | results | failed | records | unrouted
    path: Path
    age_days: float


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, (Path(root) / name).lstat().st_mtime)
                except FileNotFoundError:
                    continue
    return newest


def _candidates(settings: Settings) -> Iterator[tuple[str, Path, float]]:
    """(area, item, days it is kept) of every item in an area with a retention; an earlier
    run's unfinished deletion is kept 0 days."""
    r = settings.retention
    for area, folder, days in (
        ("archive", settings.archive_dir, r.archive_days),
        ("results", settings.results_dir, r.results_days),
        ("failed", settings.failed_dir, r.failed_days),
        ("records", settings.spool_dir / MPPS_DIR, r.records_days),
        ("unrouted", settings.unrouted_dir, r.unrouted_days),
    ):
        if days is None or not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(_DOOMED):
                yield area, entry, 0.0  # an earlier run's unfinished deletion
            elif not entry.name.startswith("."):
                yield area, entry, days


def prune(settings: Settings, *, dry_run: bool = False, now: float | None = None) -> list[Pruned]:
    """Remove what is older than its area's retention; returns what was (or would be) removed."""
    now = time.time() if now is None else now
    done: list[Pruned] = []
    for area, path, days in _candidates(settings):
        try:
            age = (now - _newest_mtime(path)) / DAY_S
        except FileNotFoundError:
            continue
        if age < days:
            continue
        done.append(Pruned(area, path, age))
        if dry_run:
            continue
        try:
            doomed = path
            if not path.name.startswith(_DOOMED):
                doomed = path.with_name(_DOOMED + path.name)
                path.rename(doomed)
            if doomed.is_dir() and not doomed.is_symlink():
                shutil.rmtree(doomed)
            else:
                doomed.unlink()
        except OSError as exc:
            log.warning("retention: could not remove %s: %s", path, exc)
    if done and not dry_run:
        counts = {a: sum(p.area == a for p in done) for a in {p.area for p in done}}
        log.info("retention: removed %s", ", ".join(f"{n} {a}" for a, n in sorted(counts.items())))
    return done


def run_periodically(settings: Settings, stop: threading.Event, every_s: float = 3600.0) -> None:
    """Prune now and then every ``every_s`` until ``stop`` is set."""
    while True:
        try:
            prune(settings)
        except OSError as exc:
            log.warning("retention run failed: %s", exc)
        if stop.wait(every_s):
            return
