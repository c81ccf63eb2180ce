"""Filesystem discipline: files appear complete or not at all.

Every file a reader may see (results, spool, failed) is written to a temporary name in the
same directory, fsynced, renamed over the final name, and the directory is fsynced so the
rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def flocked(path: Path, *, exclusive: bool = True) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing). Each call opens its own descriptor, so
    threads of one process exclude each other as processes do; closing releases the lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file."""
    tmp = _stage(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_in_phases(phases: Sequence[Sequence[tuple[Path, bytes]]]) -> None:
    """Write many files so that each appears complete, and a phase's files appear only once
    every earlier phase's files are durable (a result.json after the files it describes).

    Written one by one, each file costs two fsyncs in turn (its data, then its folder): for a
    study's nine results some 50 ms on a VM disk, against 13 ms like this. Every file's data is
    written to a temporary name and fsynced concurrently (fsync releases the GIL, and the disk
    takes the flushes together); then, phase by phase, the files are renamed into place and
    each folder they are in is fsynced once. On an error, no temporary file is left behind;
    files of earlier phases stay, complete."""
    items = [item for phase in phases for item in phase]
    if not items:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        futures = [pool.submit(_stage, path, data) for path, data in items]
        errors = [e for f in futures if (e := f.exception()) is not None]
        staged = [f.result() for f in futures if f.exception() is None]
        placed = 0  # staged files renamed into place so far, in order
        try:
            if errors:
                raise errors[0]
            for phase in phases:
                for (path, _), tmp in zip(phase, staged[placed : placed + len(phase)], strict=True):
                    os.replace(tmp, path)
                    placed += 1
                list(pool.map(fsync_dir, {path.parent for path, _ in phase}))
        finally:
            for tmp in staged[placed:]:
                tmp.unlink(missing_ok=True)


def _stage(path: Path, data: bytes) -> Path:
    """``data`` under a temporary name beside ``path``, fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A leading dot and a .tmp suffix: the inbox watcher and readers of results ignore both.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def move_into(src: Path, dest_dir: Path) -> Path:
    """Move ``src`` (file, link or folder) into ``dest_dir`` and return its new path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    move(src, dest)
    fsync_dir(dest_dir)
    return dest


def move(src: Path, dest: Path) -> None:
    """Rename ``src`` (file, link or folder) to ``dest``, replacing it.

    Within one filesystem this is an atomic rename; across filesystems the copy goes to a
    temporary name first (``.<name>.moving``: a dot-file, never taken for the real one), a
    file's copy synced, so the destination never holds a partial copy.
    """
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.moving")
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, tmp, symlinks=True)
        else:
            shutil.copy2(src, tmp, follow_symlinks=False)
            if not tmp.is_symlink():
                with tmp.open("rb") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, dest)
        if src.is_dir() and not src.is_symlink():
            shutil.rmtree(src)
        else:
            src.unlink()
