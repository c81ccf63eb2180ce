"""A result as a PDF report (fpdf2), for the RIS and the record: the study and series, the
model with its version and its weights' checksum, the findings, thumbnails of the key images
and the disclaimer; and as a DICOM Encapsulated PDF in a new series of the source study, for a
PACS. The PDF is made for every input (``report.pdf`` beside result.json); the DICOM object
only for DICOM input, whose study it joins."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import highdicom as hd
import numpy as np
from fpdf import FPDF
from fpdf.enums import XPos, YPos
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from pipeline import __version__
from pipeline.core.contract import ModelContract
from pipeline.core.results import Result
from pipeline.outputs.keyimages import KeyView
from pipeline.outputs.sources import Sources, conformant_header, result_uid

PDF_SERIES_NUMBER = 9905  # after the presentation state's 9904
DISCLAIMER = (
    "Produced automatically by an AI model. It is not a diagnosis: read it with the original "
    "images. It names what the model found, not what it may have missed."
)
DEMO_DISCLAIMER = "DEMO WEIGHTS, trained on synthetic data: NOT FOR DIAGNOSTIC USE. " + DISCLAIMER


@dataclass(frozen=True)
class Weights:
    """What the worker knows of a model version's weights file."""

    sha256: str | None  # None: the file is not readable from the worker
    demo: bool  # the project's demo weights (their note says so)


def weights_of(repository: Path | None, contract: ModelContract, version: str) -> Weights:
    """The checksum of ``<repository>/<model>/<version>/<weights>``, from the note written
    beside demo weights or by hashing the file (cached while the file is unchanged)."""
    if repository is None:
        return Weights(None, False)
    path = repository / contract.name / (version or "1") / contract.weights
    try:
        stat = path.stat()
    except OSError:
        return Weights(None, False)
    return _weights(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _weights(path: Path, mtime_ns: int, size: int) -> Weights:
    note = path.with_suffix(".json")
    try:
        about = json.loads(note.read_text())
        return Weights(str(about["sha256"]), str(about.get("kind", "")).startswith("demo"))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return Weights(digest.hexdigest(), False)


def _latin(text: object) -> str:
    """The PDF's core fonts are Latin-1: anything else is shown as '?', never an error."""
    return str(text).encode("latin-1", "replace").decode("latin-1")


def report_pdf(
    result: Result,
    contract: ModelContract,
    weights: Weights,
    header: Dataset | None,
    views: list[KeyView],
) -> bytes:
    """The report: one A4 page, more when there are many lesions or key images."""
    pdf = FPDF(format="A4")
    pdf.set_title(_latin(f"AI result: {contract.name}"))
    pdf.set_creator(f"dicom-pipeline {__version__}")
    pdf.add_page()
    pdf.set_font("helvetica", "B", 16)
    _line(pdf, f"AI result: {contract.name}", 9)
    pdf.set_font("helvetica", "B", 10)
    pdf.set_text_color(200, 0, 0) if weights.demo else pdf.set_text_color(0, 0, 0)
    pdf.multi_cell(0, 5, _latin(DEMO_DISCLAIMER if weights.demo else DISCLAIMER))
    pdf.set_text_color(0, 0, 0)
    _section(pdf, "Study", _identity(result, header))
    _section(
        pdf,
        "Model",
        [
            ("Model", f"{contract.name}, version {result.model.version or '1'}"),
            ("Weights SHA-256", weights.sha256 or "not readable from the worker"),
            ("Made by", f"dicom-pipeline {__version__} on {result.worker.host}"),
            ("Finished", result.timings.finished.isoformat(timespec="seconds")),
        ],
    )
    _section(pdf, "Findings", _findings(result))
    _thumbnails(pdf, views)
    return bytes(pdf.output())


def _line(pdf: FPDF, text: str, height: float) -> None:
    pdf.cell(0, height, _latin(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _section(pdf: FPDF, title: str, rows: list[tuple[str, str]]) -> None:
    pdf.ln(3)
    pdf.set_font("helvetica", "B", 12)
    _line(pdf, title, 7)
    for name, value in rows:
        pdf.set_font("helvetica", "B", 9)
        pdf.cell(45, 5, _latin(name))
        pdf.set_font("helvetica", "", 9)
        pdf.multi_cell(0, 5, _latin(value), new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _identity(result: Result, header: Dataset | None) -> list[tuple[str, str]]:
    """Who and what the result is about: the source's patient, study and series."""
    rows = []
    if header is not None:
        for name, keyword in (
            ("Patient", "PatientName"),
            ("Patient ID", "PatientID"),
            ("Accession number", "AccessionNumber"),
            ("Study date", "StudyDate"),
            ("Study", "StudyDescription"),
            ("Series", "SeriesDescription"),
            ("Modality", "Modality"),
        ):
            value = header.get(keyword)
            if keyword == "PatientName" and isinstance(value, PersonName):
                value = value.family_comma_given() or str(value)
            if str(value or "").strip():
                rows.append((name, str(value)))
    rows += [
        ("Study UID", result.input.study_uid or "-"),
        ("Series UID", result.input.series_uid or "-"),
        ("Input", result.input.name),
    ]
    return rows


def _findings(result: Result) -> list[tuple[str, str]]:
    rows = [("Answer", result.prediction.label)]
    rows += [(f"p({name})", f"{p:.3f}") for name, p in result.prediction.probabilities.items()]
    if (seg := result.segmentation) is not None:
        rows.append(("Lesions", f"{len(seg.lesions)}, {seg.total_volume_ml:.2f} ml in all"))
        for i, lesion in enumerate(seg.lesions, start=1):
            centre = ", ".join(f"{v:.1f}" for v in lesion.centre_ras_mm)
            rows.append((f"Lesion {i}", f"{lesion.volume_ml:.2f} ml, centre ({centre}) mm RAS"))
    return rows


def _thumbnails(pdf: FPDF, views: list[KeyView]) -> None:
    """The key images, two to a row, each with what it shows."""
    if not views:
        return
    pdf.ln(3)
    pdf.set_font("helvetica", "B", 12)
    _line(pdf, "Key images", 7)
    pdf.set_font("helvetica", "", 8)
    side = 85.0
    row_y = pdf.get_y()
    for i, view in enumerate(views):
        if i % 2 == 0 and row_y + side + 8 > pdf.h - pdf.b_margin:
            pdf.add_page()
            row_y = pdf.get_y()
        x = pdf.l_margin + (i % 2) * (side + 5)
        rows, cols = view.rgb.shape[:2]
        w, h = (side, side * rows / cols) if cols >= rows else (side * cols / rows, side)
        pdf.image(Image.fromarray(np.asarray(view.rgb), "RGB"), x=x, y=row_y, w=w, h=h)
        pdf.set_xy(x, row_y + h + 1)
        pdf.cell(side, 4, _latin(view.title))
        if i % 2 == 1:
            row_y += side + 7
    pdf.set_xy(pdf.l_margin, row_y + (side + 7 if len(views) % 2 else 0))


def build_pdf(
    sources: Sources,
    pdf: bytes,
    contract: ModelContract,
    result: Result,
    manufacturer: str,
    key: str,
    made: list[Dataset],
) -> Dataset:
    """The report as a DICOM Encapsulated PDF in the source study, referencing the source
    instances and the objects its pages show (``made``: the key images)."""
    first = conformant_header(next(iter(sources.headers.values())))
    now = datetime.now()
    doc = hd.SOPClass(
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=result_uid(key, "pdf-series"),
        series_number=PDF_SERIES_NUMBER,
        sop_instance_uid=result_uid(key, "pdf"),
        sop_class_uid=EncapsulatedPDFStorage,
        instance_number=1,
        modality="DOC",
        manufacturer=manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"AI {contract.name} report"[:64],
        manufacturer_model_name=contract.name[:64],
        software_versions=__version__,
        content_date=now.date(),
        content_time=now.time(),
    )
    doc.copy_patient_and_study_information(first)
    doc.ConversionType = "WSD"  # made on a workstation, not scanned
    doc.BurnedInAnnotation = "YES"
    doc.DocumentTitle = f"AI result: {contract.name}"[:64]
    doc.ConceptNameCodeSequence = DicomSequence()
    doc.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    doc.MIMETypeOfEncapsulatedDocument = "application/pdf"
    doc.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    doc.EncapsulatedDocumentLength = len(pdf)
    doc.SourceInstanceSequence = DicomSequence(
        [_reference(ds) for ds in [*sources.headers.values(), *made]]
    )
    return doc


def _reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item
