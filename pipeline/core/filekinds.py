"""What a file is: the kinds the pipeline reads, and the other files of a DICOM medium.

A folder copied from a patient CD or a USB stick is a DICOM medium when it holds a DICOMDIR
(PS3.10's index of a file-set): its images are its DICOM files, and the rest (the DICOMDIR,
a README, a viewer program with its icons) is the medium's, not images to process or send.
The inbox watcher, ``send``, ``infer`` and ``route`` all tell them apart by this one rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import MediaStorageDirectoryStorage

from pipeline.core.contract import InputKind
from pipeline.core.errors import InputError

DICOMDIR = "DICOMDIR"  # PS3.10's file ID of a medium's index

_SUFFIX_KINDS = {
    ".png": InputKind.IMAGE,
    ".jpg": InputKind.IMAGE,
    ".jpeg": InputKind.IMAGE,
    ".nii": InputKind.NIFTI,
    ".nii.gz": InputKind.NIFTI,
    ".dcm": InputKind.DICOM,
}


def detect_kind(path: Path) -> InputKind:
    """What a dropped file is, by its suffix or DICOM's preamble; InputError for anything else."""
    name = path.name.lower()
    for suffix, kind in _SUFFIX_KINDS.items():
        if name.endswith(suffix):
            return kind
    with path.open("rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return InputKind.DICOM
    raise InputError(
        f"unsupported file type (suffix {''.join(path.suffixes[-2:]) or 'none'!r}): "
        "expected .png, .jpg, .nii, .nii.gz or DICOM"
    )


def kind_of(path: Path) -> InputKind | None:
    """:func:`detect_kind`, None for a file of no kind the pipeline reads (or unreadable)."""
    try:
        return detect_kind(path)
    except (InputError, OSError):
        return None


def is_dicomdir(path: Path) -> bool:
    """A DICOM medium's index: PS3.10 names it DICOMDIR; a copy under another name (kept
    beside it by a burning tool, say) is known by its file meta's SOP class."""
    if path.name.upper() == DICOMDIR:
        return True
    if kind_of(path) is not InputKind.DICOM:
        return False
    try:
        meta = read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - any of pydicom's on a bad header: not an index, then
        return False
    return bool(meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage)


def medium_extras(files: Iterable[Path]) -> list[Path]:
    """Of the files of one folder, those that are not the images of a DICOM medium: [] unless
    a DICOMDIR is among them; else the DICOMDIR and every file that is not DICOM."""
    files = list(files)
    indexes = {f for f in files if is_dicomdir(f)}
    if not indexes:
        return []
    return [f for f in files if f in indexes or kind_of(f) is not InputKind.DICOM]


def why_extra(path: Path) -> str:
    """Why a file of :func:`medium_extras` is passed over, in words."""
    if is_dicomdir(path):
        return "a DICOMDIR, the index of a DICOM medium, holds no image"
    return "not DICOM, on a DICOM medium (a folder with a DICOMDIR): not one of its images"


def collect(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """Files named, and every file under folders named (hidden ones skipped), sorted; and
    apart, the files under a folder named that is a DICOM medium but are not its images (its
    DICOMDIR, a README, a viewer: :func:`medium_extras`)."""
    out: list[Path] = []
    extras: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = [
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            ]
            aside = set(medium_extras(found))
            out.extend(f for f in found if f not in aside)
            extras.extend(f for f in found if f in aside)
        else:
            out.append(p)
    return out, extras
