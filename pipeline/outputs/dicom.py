"""A result's DICOM objects, made and validated before anything is written: the SEG
(:mod:`pipeline.outputs.seg`), the SR (:mod:`pipeline.outputs.sr`) that references it, the
key images (:mod:`pipeline.outputs.sc`), the presentation state (:mod:`pipeline.outputs.gsps`),
the PDF report and its Encapsulated PDF (:mod:`pipeline.outputs.report`), and the key object
selection (:mod:`pipeline.outputs.kos`) that flags the key slices and all of them.

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
    EncapsulatedPDFStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from pipeline.core.contract import ModelContract
from pipeline.core.errors import OutputError
from pipeline.core.results import DicomIssue, Result
from pipeline.outputs import defects
from pipeline.outputs.gsps import build_gsps
from pipeline.outputs.keyimages import KeyView, png
from pipeline.outputs.kos import build_kos
from pipeline.outputs.report import Weights, build_pdf, report_pdf, weights_of
from pipeline.outputs.sc import build_sc, key_views
from pipeline.outputs.seg import build_seg
from pipeline.outputs.sources import Sources
from pipeline.outputs.sr import build_sr
from pipeline.outputs.validation import IodCheck, check, mode_name, summary

log = logging.getLogger(__name__)

SR_FILE = "sr.dcm"
SEG_FILE = "seg.dcm"
KOS_FILE = "kos.dcm"
PR_FILE = "pr.dcm"
PDF_FILE = "report.dcm"
REPORT_FILE = "report.pdf"


@dataclass(frozen=True)
class DicomOutputs:
    """What DICOM to make for one result, from what, and where a withheld object is kept."""

    kinds: tuple[str, ...]  # the route's outputs: "sr", "seg", "sc", "gsps", "kos", "pdf"
    sources: Sources | None  # None for a PNG or NIfTI input
    key: str  # job and series: with the model, the seed of the objects' UIDs
    manufacturer: str
    institution: str | None
    iod_check: IodCheck
    reject_dir: Path  # in the job's folder, so it moves to data/failed/ with the job
    source_defects: Literal["write", "withhold"] = "write"
    key_images: int = 5  # at most this many secondary captures per result, largest lesion first
    model_repository: Path | None = None  # where the weights' checksum is read; None: unknown


@dataclass
class DicomMade:
    """The objects to write, by file name, and what did not pass as made."""

    files: dict[str, bytes] = field(default_factory=dict)
    issues: list[DicomIssue] = field(default_factory=list)
    other: dict[str, bytes] = field(default_factory=dict)  # not DICOM: the PDF report
    key_image: bytes | None = None  # the first key image as PNG: the result's preview

    @property
    def own_errors(self) -> str | None:
        """Errors of our own making, in one line: the result is made, then this fails it."""
        own = [f"{i.file} {'; '.join(i.own)}" for i in self.issues if i.own]
        return "; ".join(own) or None


def make_dicom(
    result: Result,
    contract: ModelContract,
    lesion_map: np.ndarray | None,
    out: DicomOutputs,
    image: np.ndarray | None = None,
) -> DicomMade:
    """A result's objects, as the route's outputs ask, each validated, with the issues of any
    that did not pass. ``image``: the channel-first input on the source's pixels, which key
    images and the presentation state are drawn over (None: a series taken image by image,
    which gets neither)."""
    made = DicomMade()
    key = f"{out.key}/{contract.name}"
    if (why := _unreferenceable(out.sources)) is not None:
        # said of the SR and SEG, the result's own objects; the rest are drawn from them
        asked = [n for n in (SEG_FILE, SR_FILE) if n[:-4] in out.kinds]
        if lesion_map is None or not lesion_map.any():
            asked = [n for n in asked if n != SEG_FILE]
        made.issues += [DicomIssue(file=name, written=False, not_made=why) for name in asked]
        log.warning("no DICOM objects for this result: %s", why)
        return made
    sr, seg = _sr_and_seg(result, contract, lesion_map, out, key, made)
    weights = weights_of(out.model_repository, contract, result.model.version)
    views = _views(result, contract, lesion_map, out, image, weights)
    if views and "sc" in out.kinds:
        made.key_image = png(views[0])
    keys = (
        _key_objects(result, contract, lesion_map, out, views, key, made)
        if image is not None
        else []
    )
    if "pdf" in out.kinds:
        pdf = report_pdf(result, contract, weights, _first_header(out.sources), views)
        made.other[REPORT_FILE] = pdf
        if out.sources is not None:
            sources = out.sources
            doc = _built(
                PDF_FILE,
                lambda: build_pdf(sources, pdf, contract, result, out.manufacturer, key, keys),
            )
            if _checked(doc, PDF_FILE, EncapsulatedPDFStorage, out, made):
                keys.append(doc)
    objects = [d for d in (sr, seg, *keys) if d is not None]
    flagged = objects or (lesion_map is not None and lesion_map.any())
    if "kos" in out.kinds and out.sources is not None and flagged:
        sources = out.sources
        kos = _built(
            KOS_FILE,
            lambda: build_kos(
                sources, lesion_map, objects, contract, result, out.manufacturer, key
            ),
        )
        _checked(kos, KOS_FILE, KeyObjectSelectionDocumentStorage, out, made)
    return made


def _sr_and_seg(
    result: Result,
    contract: ModelContract,
    lesion_map: np.ndarray | None,
    out: DicomOutputs,
    key: str,
    made: DicomMade,
) -> tuple[Dataset | None, Dataset | None]:
    """The SEG (a segmentation with lesions) and the SR that references it, those asked for
    and valid."""
    # No lesion, no segment: the SR alone says "absent".
    segments = out.sources is not None and lesion_map is not None and bool(lesion_map.any())
    wanted = [n for n, on in ((SEG_FILE, segments), (SR_FILE, True)) if n[:-4] in out.kinds and on]
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
    return sr, seg


def _views(
    result: Result,
    contract: ModelContract,
    lesion_map: np.ndarray | None,
    out: DicomOutputs,
    image: np.ndarray | None,
    weights: Weights,
) -> list[KeyView]:
    """The key images' pixels, for the secondary captures and the report's thumbnails."""
    if image is None or out.sources is None or not {"sc", "pdf"} & set(out.kinds):
        return []
    try:
        return key_views(
            image, lesion_map, out.sources, contract, result, weights.demo, out.key_images
        )
    except (ValueError, IndexError, KeyError, OSError) as exc:
        log.warning("key images not drawn: %s", exc)  # the rest of the result stands
        return []


def _key_objects(
    result: Result,
    contract: ModelContract,
    lesion_map: np.ndarray | None,
    out: DicomOutputs,
    views: list[KeyView],
    key: str,
    made: DicomMade,
) -> list[Dataset]:
    """The secondary captures and the presentation state, those asked for and valid."""
    objects: list[Dataset] = []
    if out.sources is None:
        return objects
    sources = out.sources
    for number, view in enumerate(views if "sc" in out.kinds else [], start=1):
        name = f"sc-{number}.dcm"
        sc = _built(
            name,
            lambda: build_sc(sources, view, number, contract, result, out.manufacturer, key),  # noqa: B023
        )
        if _checked(sc, name, SecondaryCaptureImageStorage, out, made):
            objects.append(sc)
    if "gsps" in out.kinds and _grayscale(sources):
        pr = _built(
            PR_FILE,
            lambda: build_gsps(sources, lesion_map, contract, result, out.manufacturer, key),
        )
        if _checked(pr, PR_FILE, GrayscaleSoftcopyPresentationStateStorage, out, made):
            objects.append(pr)
    return objects


def _grayscale(sources: Sources) -> bool:
    """A grayscale presentation state applies to grayscale images only."""
    return all(int(h.get("SamplesPerPixel", 1)) == 1 for h in sources.headers.values())


def _first_header(sources: Sources | None) -> Dataset | None:
    return next(iter(sources.headers.values()), None) if sources else None


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
