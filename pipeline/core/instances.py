"""Received DICOM instances, on disk before the sender hears "success".

Each instance is written as received (preamble, file meta, the sender's encoded bytes) to
``spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: first to
``spool/.incoming/`` and fsynced, then renamed into place and the folder fsynced. The three UIDs
are validated before they become path parts. A study folder is turned into a job by
:func:`pipeline.ingest.completion.close_study`, which renames it away; writers and that rename are
serialised by one lock file (shared for writers, exclusive for the rename), which works across
threads and processes alike.
"""

from __future__ import annotations

import filecmp
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import RE_VALID_UID

from pipeline.core.errors import InputError, PipelineError
from pipeline.core.fsutil import flocked, fsync_dir, move

INCOMING = ".incoming"
LOCK_FILE = ".studies.lock"
SUFFIX = ".dcm"
# In a study folder assembled from inbox files: one JSON line per instance, naming the file it
# came from (errors name instances by SOP Instance UID; users know their files by name).
INBOX_FILES = "inbox-files.jsonl"
_UID_TAGS = (0x0020000D, 0x0020000E, 0x00080018)


class InvalidUIDError(InputError):
    """A UID that is missing or not a valid UID: it must not become a path."""


class OutOfSpaceError(PipelineError):
    """The spool is below its free-space watermark; nothing was written."""


@dataclass(frozen=True)
class InstanceUIDs:
    study: str
    series: str
    sop: str


def check_uid(value: object, what: str) -> str:
    """A UID as PS3.5 defines it (digits and dots, no leading zeros, <= 64 characters).

    Anything else, including ``..`` and ``/``, is refused before it can reach a path."""
    text = "" if value is None else str(value)
    # fullmatch: the pattern's "$" alone would accept a trailing newline.
    if len(text) > 64 or not RE_VALID_UID.fullmatch(text):
        raise InvalidUIDError(f"{what} {text[:80]!r} is not a valid DICOM UID")
    return text


def identify(ds: Dataset) -> InstanceUIDs:
    return InstanceUIDs(
        study=check_uid(_raw_value(ds, 0x0020000D), "StudyInstanceUID"),
        series=check_uid(_raw_value(ds, 0x0020000E), "SeriesInstanceUID"),
        sop=check_uid(_raw_value(ds, 0x00080018), "SOPInstanceUID"),
    )


def header_text(ds: Dataset, tag: int) -> str:
    """A short text element (Modality, SOP Class UID) as read, "" when absent."""
    value = _raw_value(ds, tag)
    return "" if value is None else str(value).strip()


def _raw_value(ds: Dataset, tag: int) -> object:
    """An element's value as read, without pydicom's conversion: a data set just read holds
    raw elements, and converting them (VR checks, a UID object each) cost more than reading
    the header. ``check_uid`` is the check that counts: anything odd (a non-ASCII byte, a
    second value after a backslash) fails it."""
    element = ds.get_item(tag)
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        return value.rstrip(b"\x00 ").decode("ascii", errors="replace")
    return value


def spool_lock(spool: Path, *, exclusive: bool) -> AbstractContextManager[None]:
    """Writers hold it shared while they rename into a study folder; closing a study holds it
    exclusively."""
    return flocked(spool / LOCK_FILE, exclusive=exclusive)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_space(spool: Path, incoming_bytes: int, min_free_bytes: int) -> None:
    free = free_bytes(spool)
    if free - incoming_bytes < min_free_bytes:
        raise OutOfSpaceError(
            f"spool has {free // 2**20} MiB free, below the {min_free_bytes // 2**20} MiB watermark"
        )


def instance_path(spool: Path, uids: InstanceUIDs) -> Path:
    return spool / uids.study / uids.series / f"{uids.sop}{SUFFIX}"


def store_instance(
    spool: Path, uids: InstanceUIDs, parts: Sequence[bytes | memoryview], min_free_bytes: int
) -> bool:
    """Write one instance, the concatenation of ``parts``, durably; True when it replaced an
    earlier copy of the same SOP instance. Raises OutOfSpaceError (nothing written) or
    OSError."""
    check_space(spool, sum(len(p) for p in parts), min_free_bytes)
    incoming = spool / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f"{uids.sop}.{secrets.token_hex(4)}.part"
    try:
        with tmp.open("wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        with spool_lock(spool, exclusive=False):
            dest = instance_path(spool, uids)
            _make_dirs(spool, dest.parent)
            replaced = dest.exists()
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return replaced


def adopt_instance(spool: Path, uids: InstanceUIDs, src: Path) -> None:
    """Move a complete, fsynced file of this filesystem (a retrieved instance) into its study
    folder, replacing an earlier copy of the same instance."""
    with spool_lock(spool, exclusive=False):
        dest = instance_path(spool, uids)
        _make_dirs(spool, dest.parent)
        os.replace(src, dest)
        fsync_dir(dest.parent)


def file_identity(path: Path) -> InstanceUIDs | None:
    """The UIDs of a DICOM file ("DICM" at byte 128), read from its header; None for any other
    file, and for one whose header cannot be read or whose UIDs are not valid UIDs (such a file
    is left to the single-file path, whose loader says what is wrong with it)."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
            if len(head) < 132 or head[128:] != b"DICM":
                return None
            f.seek(0)
            ds = dcmread(f, stop_before_pixels=True, specific_tags=list(_UID_TAGS))
        return identify(ds)
    except Exception:  # noqa: BLE001 - a bad UID, an I/O error, any of pydicom's on a bad header
        return None


class Placed(StrEnum):
    """What :func:`place_file` did with a file."""

    MOVED = "moved"
    SAME = "same"  # the folder holds this instance, byte for byte: the copy was removed
    # ... in another encoding (a transfer syntax, trailing padding): the same elements and the
    # same image once decoded; the copy was removed
    RECODED = "recoded"
    CONFLICT = "conflict"  # the folder holds another file of this instance: nothing moved


def place_file(spool: Path, uids: InstanceUIDs, src: Path, note: str) -> Placed:
    """Move a complete file (from the inbox) into its study folder, where the receiver puts a
    received instance, and append ``note`` (one line) to the folder's :data:`INBOX_FILES`.
    A second copy of an instance already there is removed if it is the same bytes (a CD
    dropped twice loses nothing) or the same instance in another encoding (a PACS's export
    compressed the second time), and left where it is if its content differs."""
    with spool_lock(spool, exclusive=False):  # the study is not closed half-way through
        dest = instance_path(spool, uids)
        if dest.exists():
            if filecmp.cmp(src, dest, shallow=False):
                placed = Placed.SAME
            elif same_instance(src, dest):
                placed = Placed.RECODED
            else:
                return Placed.CONFLICT
            src.unlink()
            return placed
        _make_dirs(spool, dest.parent)
        move(src, dest)  # across filesystems by a .moving file: never seen as an instance
        with (dest.parent.parent / INBOX_FILES).open("a") as f:
            f.write(note.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(dest.parent)
    return Placed.MOVED


# Not content: the pixels are compared decoded, and padding at the end of a data set is filler.
_ENCODING_ONLY = {0x7FE00010, 0xFFFCFFFC}


def same_instance(a: Path, b: Path) -> bool:
    """Two files of one instance that differ only in their encoding: every data element
    equal (file meta aside: it names the transfer syntax) and the pixels equal once decoded.
    Decoded here only, when two copies collide; any file that cannot be read or decoded is
    taken to differ."""
    try:
        first, second = dcmread(a), dcmread(b)
        elements = [
            {e.tag: e.value for e in ds if e.tag not in _ENCODING_ONLY} for ds in (first, second)
        ]
        if elements[0] != elements[1] or ("PixelData" in first) != ("PixelData" in second):
            return False
        return "PixelData" not in first or bool(
            np.array_equal(first.pixel_array, second.pixel_array)
        )
    except Exception:  # noqa: BLE001 - pydicom and its decoders raise many types on bad files
        return False


def inbox_files(study_dir: Path) -> dict[str, str]:
    """SOP Instance UID -> the inbox file it came from, as :func:`place_file` noted them in
    order; empty for a study not gathered from the inbox."""
    try:
        lines = (study_dir / INBOX_FILES).read_text().splitlines()
    except FileNotFoundError:
        return {}
    names = {}
    for line in lines:
        try:
            item = json.loads(line)
            names[str(item["sop"])] = str(item["file"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash names nothing
    return names


def _make_dirs(spool: Path, series_dir: Path) -> None:
    """Create study/series folders; a new folder's entry in its parent is fsynced too."""
    if series_dir.is_dir():
        return
    study_dir = series_dir.parent
    if not study_dir.is_dir():
        study_dir.mkdir(exist_ok=True)
        fsync_dir(spool)
    series_dir.mkdir(exist_ok=True)
    fsync_dir(study_dir)


def clean_incoming(spool: Path) -> int:
    """Remove partial writes left by a crash (never acknowledged, so the sender retries)."""
    incoming = spool / INCOMING
    if not incoming.is_dir():
        return 0
    removed = 0
    for part in incoming.glob("*.part"):
        part.unlink(missing_ok=True)
        removed += 1
    return removed
