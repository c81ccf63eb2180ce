"""A result as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report), built with highdicom,
that a PACS files beside the images.

The SR's observer is the device (the model); its findings carry TID 4019 algorithm
identification; a classification is a coded qualitative evaluation (the contract's codes, or
the private scheme ``99DCMPIPE``) with the label's probability as a measurement (UCUM ``1``);
a segmentation adds one TID 1411 volumetric group per lesion, its volume in ml referencing
its SEG segment (:mod:`pipeline.outputs.seg`); a series taken image by image adds one group
per image, its answer referencing that image. Patient and study come from the source
instances (:mod:`pipeline.outputs.sources`), so the report joins the source study, in a new
series.
"""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipeline.core.contract import ModelContract
from pipeline.core.results import Prediction, Result
from pipeline.outputs.sources import Sources, coded, conformant_header, result_uid

SR_SERIES_NUMBER = 9901
ML = Code("ml", "UCUM", "milliliter")
NO_UNITS = codes.UCUM.NoUnits  # UCUM "1": a probability is a pure number
_PROCEDURES = {"CT": codes.LN.CTUnspecifiedBodyRegion, "MR": codes.LN.MRIUnspecifiedBodyRegion}
Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
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
    groups: list[Group] = [_finding(result, contract, sources, algorithm, key)]
    if len(result.images) > 1 and sources is not None:
        groups += _image_findings(result, contract, sources, algorithm, key)
    if seg is not None and result.segmentation is not None and sources is not None:
        groups += _lesion_groups(result, contract, sources, seg, algorithm, key)
    modality = sources.modality if sources is not None else ""
    report = hd.sr.MeasurementReport(
        observation_context=_observed_by(result, contract, manufacturer),
        procedure_reported=_PROCEDURES.get(modality, codes.SCT.ImagingProcedure),
        imaging_measurements=groups,
    )
    if sources is not None:
        first, *rest = sources.headers.values()
        evidence = [conformant_header(first), *rest, *([seg] if seg is not None else [])]
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


def _observed_by(
    result: Result, contract: ModelContract, manufacturer: str
) -> hd.sr.ObservationContext:
    """The observer is the device: the model, by name and version."""
    return hd.sr.ObservationContext(
        observer_device_context=device_observer(result, contract, manufacturer)
    )


def device_observer(
    result: Result, contract: ModelContract, manufacturer: str
) -> hd.sr.ObserverContext:
    """The model, by name and version, as the observing device (of the SR and of the KOS)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", contract.name, result.model.version),
        name=contract.name[:64],
        manufacturer_name=manufacturer,
        model_name=f"{contract.name} {result.model.version}"[:64],
    )
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device
    )


def _finding(
    result: Result,
    contract: ModelContract,
    sources: Sources | None,
    algorithm: hd.sr.AlgorithmIdentification,
    key: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The label, coded, with its probability."""
    # A classifier's finding names every image it was drawn from. A segmentation's finding
    # does not: its lesions' groups reference the SEG, whose frames reference the images,
    # and the evidence lists every source instance either way. Each of 200 references is a
    # content item that highdicom copies and searches: a third of the SR's building time.
    images = sources if sources is not None and result.segmentation is None else None
    return _group(
        result.prediction,
        contract,
        algorithm,
        hd.sr.TrackingIdentifier(
            uid=result_uid(key, "finding"), identifier=f"{contract.name} finding"[:64]
        ),
        images.slices if images is not None else [],
        images,
    )


def _image_findings(
    result: Result,
    contract: ModelContract,
    sources: Sources,
    algorithm: hd.sr.AlgorithmIdentification,
    key: str,
) -> list[Group]:
    """A series taken image by image: after the series' finding, one group per image with
    that image's answer, referencing it alone."""
    groups: list[Group] = []
    for i, answer in enumerate(result.images, start=1):
        uid = answer.sop_instance_uid
        frame = None if answer.frame is None else answer.frame - 1
        tracking = hd.sr.TrackingIdentifier(
            uid=result_uid(key, "finding", uid, str(answer.frame)),
            identifier=f"{contract.name} image {i}"[:64],
        )
        groups.append(
            _group(answer.prediction, contract, algorithm, tracking, [(uid, frame)], sources)
        )
    return groups


def _group(
    prediction: Prediction,
    contract: ModelContract,
    algorithm: hd.sr.AlgorithmIdentification,
    tracking: hd.sr.TrackingIdentifier,
    images: list[tuple[str, int | None]],
    sources: Sources | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A label, coded, with its probability, drawn from ``images`` (instance, 0-based frame)."""
    label = prediction.label
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=coded(contract.codes.finding), value=coded(contract.codes.label(label))
            )
        ],
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=float(prediction.probabilities[label]),
                unit=NO_UNITS,
                algorithm_id=algorithm,
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=sources.headers[uid].SOPClassUID,
                referenced_sop_instance_uid=uid,
                referenced_frame_numbers=None if frame is None else [frame + 1],
            )
            for uid, frame in images
        ]
        if sources is not None and images
        else None,
    )


def _lesion_groups(
    result: Result,
    contract: ModelContract,
    sources: Sources,
    seg: Dataset,
    algorithm: hd.sr.AlgorithmIdentification,
    key: str,
) -> list[Group]:
    """A TID 1411 volumetric group per lesion: its volume, referencing its SEG segment."""
    assert result.segmentation is not None
    series_uid = str(next(iter(sources.headers.values())).SeriesInstanceUID)
    return [
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
        for i, lesion in enumerate(result.segmentation.lesions, start=1)
    ]


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
