"""A result's DICOM objects, made and validated before anything is written: the SEG
(:mod:`pipeline.outputs.seg`), the SR (:mod:`pipeline.outputs.sr`) that references it, and
the key object selection (:mod:`pipeline.outputs.kos`) that flags them and the key slices.

A model's answer is never lost to its source's flaws. An object whose validation errors all
came from the source (:mod:`pipeline.outputs.defects`) is written and flagged, or withheld, as
``output.source_defects`` says; one with errors of our own is withheld and the OutputError the
caller gets after the result is made names them; one that cannot be made from its source (a
retired SOP class highdicom does not know) is left out with a warning. Each is listed in
``result.json``'s ``dicom_issues``; a withheld object is kept in the job's folder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SegmentationStorage,
)

from pipeline.core.contract import ModelContract
from pipeline.core.errors import OutputError
from pipeline.core.results import DicomIssue, Result
from pipeline.outputs import defects
from pipeline.outputs.kos import build_kos
from pipeline.outputs.seg import build_seg
from pipeline.outputs.sources import Sources
from pipeline.outputs.sr import build_sr
from pipeline.outputs.validation import IodCheck, check, mode_name, summary

log = logging.getLogger(__name__)

SR_FILE = "sr.dcm"
SEG_FILE = "seg.dcm"
KOS_FILE = "kos.dcm"


@dataclass(frozen=True)
class DicomOutputs:
    """What DICOM to make for one result, from what, and where a withheld object is kept."""

    kinds: tuple[str, ...]  # the route's outputs: "sr", "seg", "kos"
    sources: Sources | None  # None for a PNG or NIfTI input
    key: str  # job and series: with the model, the seed of the objects' UIDs
    manufacturer: str
    institution: str | None
    iod_check: IodCheck
    reject_dir: Path  # in the job's folder, so it moves to data/failed/ with the job
    source_defects: Literal["write", "withhold"] = "write"


@dataclass
class DicomMade:
    """The objects to write, by file name, and what did not pass as made."""

    files: dict[str, bytes] = field(default_factory=dict)
    issues: list[DicomIssue] = field(default_factory=list)

    @property
    def own_errors(self) -> str | None:
        """Errors of our own making, in one line: the result is made, then this fails it."""
        own = [f"{i.file} {'; '.join(i.own)}" for i in self.issues if i.own]
        return "; ".join(own) or None


def make_dicom(
    result: Result, contract: ModelContract, lesion_map: np.ndarray | None, out: DicomOutputs
) -> DicomMade:
    """The SR (and SEG) of a result, validated, with the issues of any that did not pass."""
    made = DicomMade()
    key = f"{out.key}/{contract.name}"
    # No lesion, no segment: the SR alone says "absent".
    segments = out.sources is not None and lesion_map is not None and bool(lesion_map.any())
    wanted = [n for n, on in ((SEG_FILE, segments), (SR_FILE, True)) if n[:-4] in out.kinds and on]
    if (why := _unreferenceable(out.sources)) is not None:
        made.issues += [DicomIssue(file=name, written=False, not_made=why) for name in wanted]
        log.warning("no SR or SEG for this result: %s", why)
        return made
    seg = None
    if SEG_FILE in wanted and out.sources is not None and lesion_map is not None:
        sources, labels = out.sources, lesion_map
        seg = _built(
            SEG_FILE,
            lambda: build_seg(sources, labels, contract, result, out.manufacturer, key),
        )
        if not _checked(seg, SEG_FILE, SegmentationStorage, out, made):
            seg = None  # withheld: the SR does not reference what is not sent
    sr = None
    if SR_FILE in wanted:
        sr = _built(
            SR_FILE,
            lambda: build_sr(
                result, contract, out.sources, seg, out.manufacturer, key, out.institution
            ),
        )
        if not _checked(sr, SR_FILE, Comprehensive3DSRStorage, out, made):
            sr = None
    if "kos" in out.kinds and out.sources is not None:
        sources, objects = out.sources, [d for d in (sr, seg) if d is not None]
        kos = _built(
            KOS_FILE,
            lambda: build_kos(
                sources, lesion_map, objects, contract, result, out.manufacturer, key
            ),
        )
        _checked(kos, KOS_FILE, KeyObjectSelectionDocumentStorage, out, made)
    return made


def _unreferenceable(sources: Sources | None) -> str | None:
    """Why our objects cannot reference the sources, or None: highdicom copies the patient and
    study from a source by its SOP class's IOD, and knows no retired class."""
    for header in sources.headers.values() if sources else []:
        uid = UID(str(header.get("SOPClassUID", "")))
        if uid.is_retired:
            return (
                f"the source's SOP class {uid} ({uid.name}) is retired; highdicom does not "
                "reference it, so no SR or SEG is made from it"
            )
    return None


def _built(name: str, build: Callable[[], Dataset]) -> Dataset:
    try:
        return build()
    except OutputError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom refuses what would be invalid (a source value out of its VR, say).
        raise OutputError(f"{name} cannot be built: {exc}") from exc


def _checked(ds: Dataset, name: str, sop_class: str, out: DicomOutputs, made: DicomMade) -> bool:
    """Validate the object; True when it is to be written (clean, or with inherited errors
    only and source_defects: write)."""
    data, errors = check(ds, sop_class, out.iod_check)
    if not errors:
        made.files[name] = data
        return True
    sources = out.sources.headers.values() if out.sources else []
    inherited, own = defects.split(errors, ds, sources)
    write = not own and out.source_defects == "write"
    made.issues.append(DicomIssue(file=name, written=write, inherited=inherited, own=own))
    what = f"{name} {mode_name(out.iod_check)}: {summary(errors)}"
    if write:
        made.files[name] = data
        log.warning("%s; written, as the errors are its source's", what)
        return True
    try:
        out.reject_dir.mkdir(parents=True, exist_ok=True)
        ds.save_as(out.reject_dir / name, enforce_file_format=True)
        where = f"kept as {out.reject_dir.name}/{name} with the job"
    except (OSError, ValueError, TypeError, AttributeError):
        where = "could not even be kept"  # the reason is what matters
    log.warning("%s; withheld (%s)", what, where)
    return False
