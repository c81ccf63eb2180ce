"""Zip archives dropped into the inbox: unpacked into a folder, then taken as a dropped folder.

Studies downloaded from an image-exchange portal or a colleague's e-mail arrive as ``.zip``.
The watcher unpacks one into a folder of the same name beside it (``study.zip`` becomes
``study/``), and that folder goes the way of any dropped folder: DICOM files into their
studies, a CD's DICOMDIR and viewer set aside, other files a job each.

An archive is checked whole before a byte is written, and refused (kept in ``data/failed/``
with the reason) if a member would land outside its folder, is a link, is encrypted, is itself
an archive (a zip that holds itself would be unpacked forever), or if the whole would unpack to
more than ``inbox.max_unpacked_mb`` or is packed suspiciously tightly (a zip bomb). Members are
written into a hidden folder, synced, and the folder renamed into view only when complete, so
the watcher never takes a half-unpacked study; the archive is removed after that. Unpacking
may be cancelled between chunks (the watcher stopping): nothing is left of it, and the archive
waits in the inbox. The folder carries a hidden marker file (:data:`MARKER`), so a watcher
started after the unpacking still knows the folder as its own, to be removed once emptied.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import threading
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

from pipeline.core.errors import InputError
from pipeline.core.filekinds import collect
from pipeline.core.fsutil import fsync_dir

ZIP_SUFFIX = ".zip"
MARKER = ".dicom-pipeline-unpacked"  # in a folder unpacking made; never taken as a file
MAX_MEMBERS = 100_000
# Images deflate a few times over (a CT's air, an X-ray's border: 2-10x). Far tighter packing
# of a large archive is a zip bomb: 200 MB of zeros packs into 200 KB, 1000x.
BOMB_RATIO = 100
BOMB_MIN_BYTES = 100 * 2**20
_CHUNK = 2**20
_NAME_ERRNOS = {errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.EEXIST, errno.ENOTDIR}


class CancelledError(Exception):
    """Unpacking stopped on request; nothing of it is left, the archive is where it was."""


class ArchiveError(InputError):
    """An archive refused whole: nothing of it was unpacked. The message, which is logged,
    leaves the member's name out (names may carry a patient's); ``member`` holds it for
    ``error.json``."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


@dataclass(frozen=True)
class Plan:
    members: list[tuple[zipfile.ZipInfo, PurePosixPath]]  # what is written, and where
    skipped: int  # macOS metadata (__MACOSX/, ._*, .DS_Store): not content
    size: int  # bytes once unpacked


def is_archive(path: PurePath) -> bool:
    return path.name.lower().endswith(ZIP_SUFFIX)


def plan(archive: zipfile.ZipFile, max_bytes: int) -> Plan:
    """What ``archive`` would unpack to; ArchiveError for any reason to refuse it."""
    members: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    seen: set[str] = set()
    skipped = size = packed = 0
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ArchiveError(f"the archive holds {len(infos)} members, more than {MAX_MEMBERS}")
    for info in infos:
        name = PurePosixPath(info.filename)
        if info.is_dir():
            continue
        if name.parts[0] == "__MACOSX" or name.name.startswith("."):
            skipped += 1
            continue
        if name.is_absolute() or ".." in name.parts or ":" in name.parts[0]:
            raise ArchiveError("a member would be unpacked outside its folder", info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError("a member is a symbolic link", info.filename)
        if info.flag_bits & 0x1:
            raise ArchiveError("the archive is password-protected: unpack it yourself")
        if is_archive(name):  # tar, 7z and the like are refused as unreadable files later
            raise ArchiveError(
                "a member is an archive itself: archives inside archives are not unpacked; "
                "unpack it yourself",
                info.filename,
            )
        if info.filename in seen:  # a second member of that name would overwrite it
            raise ArchiveError("two members have the same name", info.filename)
        seen.add(info.filename)
        members.append((info, name))
        size += info.file_size
        packed += info.compress_size
    if not members:
        but = " but macOS metadata" if skipped else ""
        raise ArchiveError(f"the archive holds no files{but}")
    folders = {str(parent) for _, name in members for parent in name.parents}
    if clash := sorted(seen & folders):
        raise ArchiveError("a member's name is both a file and a folder", clash[0])
    if size > max_bytes:
        raise ArchiveError(
            f"the archive would unpack to {size / 2**20:.0f} MB, more than "
            f"inbox.max_unpacked_mb ({max_bytes / 2**20:.0f} MB)"
        )
    if size >= BOMB_MIN_BYTES and size > BOMB_RATIO * max(packed, 1):
        raise ArchiveError(
            f"the archive would unpack {packed} bytes into {size / 2**20:.0f} MB "
            f"({size // max(packed, 1)}x): too tightly packed for images, refused as a zip bomb"
        )
    return Plan(members, skipped, size)


def open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except OSError:
        raise
    except Exception as exc:  # BadZipFile, and whatever else a malformed directory raises
        raise ArchiveError(f"not a readable zip archive ({type(exc).__name__})") from exc


def unpack(
    path: Path, archive: zipfile.ZipFile, todo: Plan, cancel: threading.Event | None = None
) -> Path:
    """Write ``todo``'s members into a new folder beside ``path``, named after it, remove
    ``path``, and return the folder. ArchiveError (nothing left behind) if a member cannot be
    read, or its name cannot be a file's here (too long; two names one on a case-blind disk);
    CancelledError, likewise, once ``cancel`` is set."""
    stem = path.name[: -len(ZIP_SUFFIX)] or "archive"
    work = work_folder(path)
    shutil.rmtree(work, ignore_errors=True)  # left by a crash
    write_members(archive, todo, work, cancel)
    # Written before the rename, so the folder is never in view without it (the watcher may
    # stop at any moment after the rename, before it has taken the folder's files).
    with (work / MARKER).open("xb") as marker:
        os.fsync(marker.fileno())
    fsync_dir(work)
    dest = path.parent / stem
    n = 1
    while dest.exists():  # the same download dropped twice: both are taken
        n += 1
        dest = path.parent / f"{stem}-{n}"
    work.rename(dest)
    fsync_dir(path.parent)
    path.unlink()
    return dest


def work_folder(path: Path) -> Path:
    """Where ``path`` is being unpacked: hidden, so the watcher takes nothing of it."""
    return path.parent / f".{path.name}.unpacking"


def unpack_copy(path: Path, into: Path, max_bytes: int) -> Path:
    """Unpack the zip ``path``, left as it is, into the new folder ``into`` (for ``send``,
    ``infer`` and ``route``, which read what they are given); ArchiveError as the inbox's."""
    with open_archive(path) as archive:
        write_members(archive, plan(archive, max_bytes), into)
    return into


def write_members(
    archive: zipfile.ZipFile, todo: Plan, work: Path, cancel: threading.Event | None = None
) -> None:
    """Each member into the new folder ``work``, synced; on any error, or once ``cancel`` is
    set (CancelledError), ``work`` is removed."""
    member = ""
    try:
        work.mkdir()
        folders = {work}
        for info, name in todo.members:
            member = info.filename
            dest = work.joinpath(*name.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            folders.add(dest.parent)
            with dest.open("xb") as out:
                for chunk in _member_bytes(archive, info):
                    if cancel is not None and cancel.is_set():
                        raise CancelledError
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        for folder in folders:
            fsync_dir(folder)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        if exc.errno in _NAME_ERRNOS:
            raise ArchiveError(
                f"a member's name cannot be a file's name here ({exc.strerror})", member
            ) from exc
        raise  # the disk's fault (full, failing): the archive waits in the inbox
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _member_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """A member's bytes, up to its declared size. Whatever reading it raises is the archive's
    fault (zipfile's BadZipFile for a bad CRC, zlib.error, lzma's, bz2's OSError...)."""
    try:
        with archive.open(info) as src:
            while chunk := src.read(_CHUNK):
                yield chunk
    except Exception as exc:  # see the docstring
        # zipfile's words name the member: kept apart from the message, which is logged
        raise ArchiveError(
            f"a member cannot be unpacked ({type(exc).__name__}: damaged, or compressed in a "
            "way not supported)",
            f"{info.filename}: {exc}",
        ) from exc


@contextmanager
def collect_unpacked(
    paths: Iterable[Path], max_unpacked_bytes: int
) -> Iterator[tuple[list[Path], list[Path]]]:
    """:func:`collect`, each zip named unpacked into a temporary folder (as the inbox would
    unpack it, the zip left as it is) for the duration; ArchiveError, naming the zip, for one
    the inbox would refuse."""
    with tempfile.TemporaryDirectory(prefix="dicom-pipeline-unzip-") as tmp:
        opened: list[Path] = []
        for i, p in enumerate(paths):
            if not (p.is_file() and is_archive(p)):
                opened.append(p)
                continue
            try:
                opened.append(unpack_copy(p, Path(tmp) / f"{i}-{p.stem}", max_unpacked_bytes))
            except ArchiveError as exc:
                raise ArchiveError(f"{p}: {exc}", exc.member) from exc
        yield collect(opened)
