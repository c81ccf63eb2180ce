"""Results as standard DICOM objects that a PACS files beside the images: a Comprehensive 3D
SR (TID 1500 Measurement Report) per result, and a Segmentation (SEG) per segmentation
result, both built with highdicom.

The SR's observer is the device (the model); its findings carry TID 4019 algorithm
identification; a classification is a coded qualitative evaluation (the contract's codes, or
the private scheme ``99DCMPIPE``) with the label's probability as a measurement (UCUM ``1``);
a segmentation adds one TID 1411 volumetric group per lesion, its volume in ml referencing
its SEG segment. Patient and study come from the source instances, so the objects join the
source study, each in a new series. UIDs are derived from the job, model and series: a
redelivered task writes (and sends) the same objects again, never a second copy.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, Comprehensive3DSRStorage, SegmentationStorage

from pipeline import __version__
from pipeline.core.contract import CodeSpec, ModelContract
from pipeline.core.errors import OutputError
from pipeline.core.results import Result
from pipeline.inference.segment import transposed
from pipeline.outputs.validation import IodCheck, encode_checked

SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9801
ML = Code("ml", "UCUM", "milliliter")
NO_UNITS = codes.UCUM.NoUnits  # UCUM "1": a probability is a pure number
_UID_NAMESPACE = uuid.UUID("5b0f2f4e-7a3c-4c41-9d1b-2f6f0c1e9a77")
_PROCEDURES = {"CT": codes.LN.CTUnspecifiedBodyRegion, "MR": codes.LN.MRIUnspecifiedBodyRegion}


@dataclass(frozen=True)
class Sources:
    """The source instances of one result: headers by SOP Instance UID (no pixel data), and for
    each plane of the volume (or the one image) the instance and 0-based frame it came from."""

    headers: dict[str, Dataset]
    slices: list[tuple[str, int | None]]

    @property
    def modality(self) -> str:
        return str(next(iter(self.headers.values())).get("Modality", ""))


# Patient and study attributes of Type 2 (present, possibly empty) that highdicom reads from the
# first source; a modality may leave them out altogether.
_PATIENT_STUDY_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


_DATES_TIMES = ("StudyDate", "StudyTime", "PatientBirthDate", "PatientBirthTime")
_LEGACY_DA = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")
_LEGACY_TM = re.compile(r"(\d{2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?")


def _conformant_header(ds: Dataset) -> Dataset:
    """``ds``, or a copy of it fixed where highdicom copies its patient and study modules into
    our objects, so that a source's defect does not make them invalid or unbuildable: missing
    Type 2 attributes empty; the ACR-NEMA forms of dates and times (``1997.04.24``,
    ``14:04:38``, still sent by old archives) in today's; and a de-identified source's missing
    method said to be missing."""
    missing = [kw for kw in _PATIENT_STUDY_TYPE2 if kw not in ds]
    legacy = {kw: v for kw in _DATES_TIMES if (v := _current_form(ds, kw)) is not None}
    # PatientIdentityRemoved YES requires a de-identification method (Type 1C): keep the flag,
    # and say truthfully that the source does not state the method.
    no_method = (
        str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
        and "DeidentificationMethod" not in ds
        and "DeidentificationMethodCodeSequence" not in ds
    )
    if not missing and not legacy and not no_method:
        return ds
    patched = copy.deepcopy(ds)  # a header: no pixel data to copy
    for keyword in missing:
        setattr(patched, keyword, "")
    for keyword, value in legacy.items():
        setattr(patched, keyword, value)
    if no_method:
        patched.DeidentificationMethod = "not stated in the source images"
    return patched


def _current_form(ds: Dataset, keyword: str) -> str | None:
    """A date or time in its ACR-NEMA form, rewritten in today's; None for anything else."""
    element = ds.get_item(keyword)
    raw = element.value if element is not None else None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw or "")
    text = text.strip(" \x00")
    if keyword.endswith("Date") and (m := _LEGACY_DA.fullmatch(text)):
        return "".join(m.groups())
    if keyword.endswith("Time") and (m := _LEGACY_TM.fullmatch(text)):
        return "".join(g for g in m.groups() if g)
    return None


def result_uid(*parts: str) -> UID:
    """A 2.25 UID from a name-based UUID (PS3.5 B.2): the same parts, the same UID."""
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(parts)).int}")


def coded(spec: CodeSpec) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=spec.value, scheme_designator=spec.scheme, meaning=spec.meaning)


def build_seg(
    sources: Sources,
    lesion_map: np.ndarray,
    contract: ModelContract,
    result: Result,
    manufacturer: str,
    key: str,
) -> Dataset:
    """One segment per lesion (numbered as in result.json), frames on the source slices.

    ``lesion_map`` is on the volume's voxels, (column, row, plane) as the volume is."""
    count = int(lesion_map.max())
    if count == 0:
        raise ValueError("no lesion: nothing to segment")
    # (plane, row, column), in the smallest type that holds the lesion numbers
    frames = transposed(lesion_map, np.uint8 if count < 256 else np.uint16)
    instances = list(dict.fromkeys(uid for uid, _ in sources.slices))
    if all(frame is None for _, frame in sources.slices):
        images = [sources.headers[uid] for uid, _ in sources.slices]  # one per plane, in order
    elif len(instances) == 1:  # one multi-frame instance: frames in its own frame order
        images = [sources.headers[instances[0]]]
        by_frame = np.empty_like(frames)
        for plane, (_, frame) in enumerate(sources.slices):
            by_frame[frame or 0] = frames[plane]
        frames = by_frame
    else:
        raise OutputError("a SEG over several multi-frame instances is not supported")
    images[0] = _conformant_header(images[0])
    algorithm = hd.AlgorithmIdentificationSequence(
        name=contract.name,
        family=codes.DCM.ArtificialIntelligence,
        version=result.model.version or "1",
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=f"Lesion {i}",
            segmented_property_category=coded(contract.codes.segment_category),
            segmented_property_type=coded(contract.codes.segment_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=result_uid(key, "lesion", str(i)),
            tracking_id=f"Lesion {i}",
        )
        for i in range(1, count + 1)
    ]
    return hd.seg.Segmentation(
        source_images=images,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=result_uid(key, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=result_uid(key, "seg"),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=contract.name[:64],
        software_versions=__version__,
        device_serial_number=result.model.version or "1",
        series_description=f"AI {contract.name}"[:64],
        content_label="LESIONS",
        content_description=f"{contract.name} lesions"[:64],
    )


def build_sr(
    result: Result,
    contract: ModelContract,
    sources: Sources | None,
    seg: Dataset | None,
    manufacturer: str,
    key: str,
    institution: str | None = None,
) -> Dataset:
    """The TID 1500 Measurement Report of one result. Without DICOM sources (a PNG or NIfTI
    input) the report stands in a study of its own, with no patient identity."""
    algorithm = hd.sr.AlgorithmIdentification(  # TID 4019
        name=contract.name,
        version=result.model.version or "1",
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=manufacturer,
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", contract.name, result.model.version),
        name=contract.name[:64],
        manufacturer_name=manufacturer,
        model_name=f"{contract.name} {result.model.version}"[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    label = result.prediction.label
    # A classifier's finding names every image it was drawn from. A segmentation's finding
    # does not: its lesions' groups reference the SEG, whose frames reference the images,
    # and the evidence lists every source instance either way. Each of 200 references is a
    # content item that highdicom copies and searches: a third of the SR's building time.
    images = sources if sources is not None and result.segmentation is None else None
    finding = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(key, "finding"), identifier=f"{contract.name} finding"[:64]
        ),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=coded(contract.codes.finding), value=coded(contract.codes.label(label))
            )
        ],
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=float(result.prediction.probabilities[label]),
                unit=NO_UNITS,
                algorithm_id=algorithm,
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=images.headers[uid].SOPClassUID,
                referenced_sop_instance_uid=uid,
                referenced_frame_numbers=None if frame is None else [frame + 1],
            )
            for uid, frame in images.slices
        ]
        if images is not None
        else None,
    )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [finding]
    if seg is not None and result.segmentation is not None and sources is not None:
        series_uid = str(next(iter(sources.headers.values())).SeriesInstanceUID)
        for i, lesion in enumerate(result.segmentation.lesions, start=1):
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=result_uid(key, "lesion", str(i)), identifier=f"Lesion {i}"
                    ),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=seg.SOPClassUID,
                        sop_instance_uid=seg.SOPInstanceUID,
                        segment_number=i,
                        source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
                    ),
                    finding_type=coded(contract.codes.segment_type),
                    algorithm_id=algorithm,
                    measurements=[
                        hd.sr.Measurement(name=codes.SCT.Volume, value=lesion.volume_ml, unit=ML)
                    ],
                )
            )
    modality = sources.modality if sources is not None else ""
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_PROCEDURES.get(modality, codes.SCT.ImagingProcedure),
        imaging_measurements=groups,
    )
    if sources is not None:
        first, *rest = sources.headers.values()
        evidence = [_conformant_header(first), *rest, *([seg] if seg is not None else [])]
    else:
        evidence = [_identity(result, key)]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=result_uid(key, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(key, "sr"),
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution,
        is_complete=True,
        series_description=f"AI {contract.name}"[:64],
    )
    if sources is None:  # the identity stand-in is no evidence: nothing is referenced
        del sr.CurrentRequestedProcedureEvidenceSequence
    return sr


def _identity(result: Result, key: str) -> Dataset:
    """Patient and study of an input that has none (PNG, NIfTI): unknown patient (Type 2
    attributes empty), a study of its own named after the job, dated when it was received."""
    received: datetime = result.timings.received
    ds = Dataset()
    ds.StudyInstanceUID = result_uid(key, "study")
    # highdicom files evidence by series and instance; the SR drops this stand-in afterwards.
    ds.SeriesInstanceUID = result_uid(key, "input-series")
    ds.SOPInstanceUID = result_uid(key, "input")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: a stand-in only
    ds.PatientID = ds.PatientName = ds.PatientBirthDate = ds.PatientSex = ""
    ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.StudyID = result.job_id[:16]
    ds.StudyDate = received.strftime("%Y%m%d")
    ds.StudyTime = received.strftime("%H%M%S")
    return ds


SR_FILE = "sr.dcm"
SEG_FILE = "seg.dcm"


@dataclass(frozen=True)
class DicomOutputs:
    """What DICOM to make for one result, from what, and where a failing object is kept."""

    kinds: tuple[str, ...]  # the route's outputs: "sr", "seg"
    sources: Sources | None  # None for a PNG or NIfTI input
    key: str  # job and series: with the model, the seed of the objects' UIDs
    manufacturer: str
    institution: str | None
    iod_check: IodCheck
    reject_dir: Path  # in the job's folder, so it moves to data/failed/ with the job


def make_dicom(
    result: Result, contract: ModelContract, lesion_map: np.ndarray | None, out: DicomOutputs
) -> dict[str, bytes]:
    """The validated SR (and SEG) of a result, by file name. An object that fails validation
    is kept in ``out.reject_dir`` and the OutputError names it; nothing goes to results."""
    files: dict[str, bytes] = {}
    key = f"{out.key}/{contract.name}"
    seg = None
    # No lesion, no segment: the SR alone says "absent".
    if "seg" in out.kinds and out.sources and lesion_map is not None and lesion_map.any():
        sources, labels = out.sources, lesion_map
        seg = _built(
            SEG_FILE,
            lambda: build_seg(sources, labels, contract, result, out.manufacturer, key),
        )
        files[SEG_FILE] = _checked(seg, SEG_FILE, SegmentationStorage, out)
    if "sr" in out.kinds:
        sr = _built(
            SR_FILE,
            lambda: build_sr(
                result, contract, out.sources, seg, out.manufacturer, key, out.institution
            ),
        )
        files[SR_FILE] = _checked(sr, SR_FILE, Comprehensive3DSRStorage, out)
    return files


def _built(name: str, build: Callable[[], Dataset]) -> Dataset:
    try:
        return build()
    except OutputError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom refuses what would be invalid (a source value out of its VR, say).
        raise OutputError(f"{name} cannot be built: {exc}") from exc


def _checked(ds: Dataset, name: str, sop_class: str, out: DicomOutputs) -> bytes:
    try:
        return encode_checked(ds, sop_class, out.iod_check)
    except OutputError as exc:
        where = f"; kept as {out.reject_dir.name}/{name} in the failed item"
        try:
            out.reject_dir.mkdir(parents=True, exist_ok=True)
            ds.save_as(out.reject_dir / name, enforce_file_format=True)
        except (OSError, ValueError, TypeError, AttributeError):
            where = ""  # the reason is what matters; the object could not even be kept
        raise OutputError(f"{name} {exc}{where}") from None
