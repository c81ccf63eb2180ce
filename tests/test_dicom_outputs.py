"""Results as DICOM: the SR (TID 1500) and SEG of a received study, read back from their files
and checked against the source and the phantom's ground truth; invalid objects kept out of
results; results sent to a DICOM peer that is down first and up later."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pipeline.core.contract import PRIVATE_SCHEME, discover_contracts
from pipeline.core.errors import OutputError
from pipeline.core.jobs import REJECTED_OUTPUTS, read_job
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import (
    TEST_PATIENT_ID,
    new_series,
    write_series,
    write_volume_series,
)
from pipeline.demo.synthetic import lesion_phantom
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.triton_client import TritonClient
from pipeline.outputs.send.dispatch import Delivery, deliver, record_failure
from pipeline.outputs.validation import encode_checked
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.runtime.process import free_port
from pipeline.studies.models import Models
from pipeline.studies.study_job import run_study

from .conftest import MODEL_REPOSITORY, make_settings, needs_dcmtk, spool_study

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
IOD_CHECK = "dciodvfy" if shutil.which("dciodvfy") else "strict-read"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _settings(tmp_path: Path, iod_check: str = IOD_CHECK, **overrides: object) -> Settings:
    return make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        output={"iod_check": iod_check},
        **overrides,
    )


def _content(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content(item)


def _code(item: Dataset, keyword: str) -> tuple[str, str]:
    seq = item[keyword][0]
    return str(seq.CodingSchemeDesignator), str(seq.CodeValue)


def _named(ds: Dataset, scheme: str, value: str) -> list[Dataset]:
    return [i for i in _content(ds) if _code(i, "ConceptNameCodeSequence") == (scheme, value)]


@pytest.fixture
def phantom_study(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> tuple[Settings, Path, dict, np.ndarray]:
    """A lesion phantom received as a CT series (without its accession number and the
    patient's birth date) and processed: (settings, the series' source folder, SOP Instance
    UID -> slice index, ground-truth mask)."""
    hu, truth, affine = lesion_phantom(TEST_SEED_BASE + 610, lesions=3)
    write_volume_series(tmp_path / "ct", hu.astype(np.float32), affine)
    for path in (tmp_path / "ct").iterdir():  # Type 2 attributes a modality may leave out
        ds = dcmread(path)
        del ds.AccessionNumber, ds.PatientBirthDate
        ds.save_as(path)
    slice_of = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): k
        for k, p in enumerate(sorted((tmp_path / "ct").iterdir()))  # 0001.dcm is slice 0
    }
    settings = _settings(tmp_path)
    job = read_job(settings.spool_dir / spool_study(settings, [tmp_path / "ct"]))
    client = new_client(triton.grpc, settings.triton)
    run_study(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)
    return settings, tmp_path / "ct", slice_of, truth


def test_seg_frames_land_on_the_right_source_slices(phantom_study: tuple) -> None:
    settings, ct, slice_of, truth = phantom_study
    source = dcmread(next(ct.iterdir()), stop_before_pixels=True)
    out = settings.results_dir / source.StudyInstanceUID / "ct_lesion_segmentation"
    seg = dcmread(out / source.SeriesInstanceUID / "seg.dcm")
    assert seg.SOPClassUID == SEG_CLASS and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID  # filed in the source study
    assert (
        seg.PatientID == TEST_PATIENT_ID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    )
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID  # a new series for the results
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    for segment in seg.SegmentSequence:
        assert _code(segment, "SegmentedPropertyTypeCodeSequence") == ("SCT", "52988006")
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
    # The mask rebuilt from the SEG file alone: each frame put on the slice of the source
    # instance it names, then compared with the phantom's truth.
    mask = np.zeros(truth.shape, bool)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    voxels = dict.fromkeys(range(1, len(seg.SegmentSequence) + 1), 0)
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ref = groups.DerivationImageSequence[0].SourceImageSequence[0]
        k = slice_of[str(ref.ReferencedSOPInstanceUID)]
        position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
        assert position[2] == pytest.approx(float(k) * 1.5)  # the slice's own position
        mask[:, :, k] |= frame.T > 0  # frames are (row, column); the phantom (x, y, z)
        voxels[groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber] += frame.sum()
    dice = 2 * (mask & (truth > 0)).sum() / (mask.sum() + (truth > 0).sum())
    assert dice >= 0.8, dice
    # Segment i is lesion i of result.json, voxel for voxel.
    result = json.loads((out / source.SeriesInstanceUID / "result.json").read_text())
    assert [voxels[i] for i in sorted(voxels)] == [
        lesion["voxels"] for lesion in result["segmentation"]["lesions"]
    ]


def test_sr_follows_tid_1500_and_references_the_source(phantom_study: tuple) -> None:
    settings, ct, slice_of, _ = phantom_study
    source = dcmread(next(ct.iterdir()), stop_before_pixels=True)
    study = settings.results_dir / source.StudyInstanceUID
    seg_dir = study / "ct_lesion_segmentation" / source.SeriesInstanceUID
    result = json.loads((seg_dir / "result.json").read_text())
    # The default outputs: SEG, SR, a key image per lesion and the KOS flagging them all.
    lesions = len(result["segmentation"]["lesions"])
    keys = [f"sc-{n}.dcm" for n in range(1, min(lesions, 5) + 1)]
    assert result["dicom"] == ["seg.dcm", "sr.dcm", *keys, "kos.dcm"]
    sr = dcmread(seg_dir / "sr.dcm")
    seg = dcmread(seg_dir / "seg.dcm", stop_before_pixels=True)
    assert sr.SOPClassUID == SR_CLASS and sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == TEST_PATIENT_ID
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
    assert _code(sr, "ConceptNameCodeSequence") == ("DCM", "126000")  # Imaging Measurement Report
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # The observer is the device: the model.
    (observer,) = _named(sr, "DCM", "121005")  # Observer Type
    assert _code(observer, "ConceptCodeSequence") == ("DCM", "121007")  # Device
    assert [i.TextValue for i in _named(sr, "DCM", "121013")] == ["ct_lesion_segmentation"]
    assert {i.TextValue for i in _named(sr, "DCM", "111001")} == {"ct_lesion_segmentation"}
    # The finding (Lesion: Present) and its probability, unit UCUM "1".
    (finding,) = _named(sr, "SCT", "52988006")
    assert _code(finding, "ConceptCodeSequence") == ("SCT", "52101004")
    (probability,) = _named(sr, "DCM", "122157")
    measured = probability.MeasuredValueSequence[0]
    assert _code(measured, "MeasurementUnitsCodeSequence") == ("UCUM", "1")
    assert float(measured.NumericValue) == pytest.approx(
        result["prediction"]["probabilities"]["lesion"]
    )
    # One volume per lesion, in ml, each referencing its SEG segment.
    volumes = _named(sr, "SCT", "118565006")
    assert [round(float(v.MeasuredValueSequence[0].NumericValue), 4) for v in volumes] == [
        lesion["volume_ml"] for lesion in result["segmentation"]["lesions"]
    ]
    assert all(
        _code(v.MeasuredValueSequence[0], "MeasurementUnitsCodeSequence") == ("UCUM", "ml")
        for v in volumes
    )
    segments = [
        i
        for i in _content(sr)
        if i.ValueType == "IMAGE" and "ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]
    ]
    assert [s.ReferencedSOPSequence[0].ReferencedSegmentNumber for s in segments] == list(
        range(1, len(volumes) + 1)
    )
    assert {s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in segments} == {
        seg.SOPInstanceUID
    }
    # Its images are referenced through the SEG alone: no content item per source image.
    assert [i for i in _content(sr) if i.ValueType == "IMAGE"] == segments
    # Evidence: every source instance and the SEG, in the current study.
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert set(slice_of) | {seg.SOPInstanceUID} <= evidence
    # The classifier's SR: its label coded in SNOMED CT, every source image referenced.
    covid_dir = study / "ct_covid_classifier" / source.SeriesInstanceUID
    label = json.loads((covid_dir / "result.json").read_text())["prediction"]["label"]
    covid = dcmread(covid_dir / "sr.dcm")
    (evaluation,) = _named(covid, "DCM", "121071")  # Finding
    expected = {"COVID Positive": "840539006", "COVID Negative": "17621005"}[label]
    assert _code(evaluation, "ConceptCodeSequence") == ("SCT", expected)
    referenced = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in _content(covid)
        if i.ValueType == "IMAGE"
    }
    assert referenced == set(slice_of)


@pytest.mark.parametrize(
    ("iod_check", "reason"),
    [
        ("strict-read", r"StudyID\(0020,0010\)>: .*16 allowed for VR SH"),
        pytest.param(
            "dciodvfy",
            r"StudyID.*invalid for this VR \[SH\]",
            marks=pytest.mark.skipif(IOD_CHECK != "dciodvfy", reason="dicom3tools missing"),
        ),
    ],
)
@pytest.mark.parametrize("source_defects", ["write", "withhold"])
def test_a_source_defect_never_loses_the_answer(
    iod_check: str,
    reason: str,
    source_defects: str,
    triton: TritonEndpoints,
    tmp_path: Path,
    new_client: Callable[..., TritonClient],
) -> None:
    """A modality that writes a value its VR forbids (a 20-character Study ID, SH allows 16):
    the SR copies it and fails validation (either check). The error is the source's: the
    result is written with it listed, and the SR written (flagged) or withheld (kept with the
    job's input) as output.source_defects says; nothing fails."""
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 611, lesions=1)
    write_volume_series(tmp_path / "ct", hu.astype(np.float32), affine)
    for path in (tmp_path / "ct").iterdir():
        ds = dcmread(path)
        ds.StudyID = "S" * 20
        ds.save_as(path)
    settings = make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        output={"iod_check": iod_check, "source_defects": source_defects},
    )
    job = read_job(settings.spool_dir / spool_study(settings, [tmp_path / "ct"]))
    client = new_client(triton.grpc, settings.triton)
    run_study(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)
    study = settings.results_dir / job.study.study_uid  # type: ignore[union-attr]
    results = {p.parent.parent.name: json.loads(p.read_text()) for p in study.rglob("result.json")}
    assert set(results) == {"ct_covid_classifier", "ct_lesion_segmentation"}
    for doc in results.values():
        [issue] = [i for i in doc["dicom_issues"] if i["file"] == "sr.dcm"]
        assert issue["own"] == [] and issue["written"] == (source_defects == "write"), issue
        assert any(re.search(reason, e) for e in issue["inherited"]), issue
        assert "S" * 20 not in json.dumps(issue)  # values withheld
        assert ("sr.dcm" in doc["dicom"]) == (source_defects == "write")
    srs = list(study.rglob("sr.dcm"))
    assert len(srs) == (2 if source_defects == "write" else 0)
    if source_defects == "withhold":
        kept = settings.archive_dir / job.id / REJECTED_OUTPUTS / "sr.dcm"
        assert dcmread(kept).SOPClassUID == SR_CLASS  # kept with the archived input
    assert not any(settings.failed_dir.iterdir())


def test_errors_the_source_gave_are_told_from_our_own() -> None:
    """The same SR with a study UID under an illegal root (the source's) and a code meaning
    out of its VR (ours: no source has it)."""
    from pipeline.outputs.defects import split

    source = Dataset()
    source.StudyInstanceUID = "9.9.9.1"
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6"
    source.SOPInstanceUID = "1.2.3.4"
    ours = Dataset()
    ours.StudyInstanceUID = "9.9.9.1"
    ours.CodeMeaning = "m" * 70
    evidence = Dataset()
    evidence.ReferencedSOPClassUID = source.SOPClassUID
    ours.CurrentRequestedProcedureEvidenceSequence = [evidence]
    errors = [
        "Error - </StudyInstanceUID(0020,000d)> - Illegal root for UID = <...>",
        "Error - </CurrentRequestedProcedureEvidenceSequence(0040,a375)[1]/"
        "ReferencedSOPClassUID(0008,1150)> - Retired SOP Class",
        "Error - </CodeMeaning(0008,0104)> - Value invalid for this VR [LO]",
        "Error - Missing attribute Type 1 Required Element=<StudyDate> Module=<GeneralStudy>",
        "Error - something without an attribute",
    ]
    inherited, own = split(errors, ours, [source])
    assert inherited == errors[:2] + errors[3:4]
    assert own == [errors[2], errors[4]]


# Values their VRs forbid, as a source might carry them into an SR: (keyword, VR, value), and
# whether pydicom's strict read-back rejects it (dciodvfy must reject each).
_BAD_VALUES = [
    ("StudyID", "SH", "S" * 20, True),
    ("AccessionNumber", "SH", "A" * 17, True),
    ("StudyInstanceUID", "UI", "1.2.abc.4", True),
    ("StudyInstanceUID", "UI", "1." + "2" * 70, True),
    ("SeriesDescription", "LO", "D" * 70, True),
    ("SliceThickness", "DS", "1,5", True),
    ("InstanceNumber", "IS", "1.5", True),
    ("ReferringPhysicianName", "PN", "x" * 70, True),
    ("StudyDate", "DA", "2024-01-01", False),
    ("StudyTime", "TM", "25:61", False),
    ("PatientSex", "CS", "m", False),
    ("BodyPartExamined", "CS", "C" * 17, False),
    ("ReferringPhysicianName", "PN", "a^b^c^d^e^f", False),
    ("StudyID", "SH", "AB\x01C", False),
    ("SeriesDescription", "LO", "Hosp\x07ital", False),
]


@pytest.mark.skipif(IOD_CHECK != "dciodvfy", reason="dicom3tools is not installed")
def test_dciodvfy_rejects_every_value_the_strict_read_back_rejects(tmp_path: Path) -> None:
    """Where dciodvfy is installed it checks outputs alone: every bad value the strict
    read-back rejects, it rejects too, naming the attribute; and it rejects more."""
    (path,) = write_series(tmp_path, new_series(slices=1, rows=16, cols=16))
    good = dcmread(path)
    # What dciodvfy wants of a CT image that the demo's synthetic slices leave out.
    good.PatientPosition, good.PositionReferenceIndicator, good.AcquisitionNumber = "HFS", "", 1
    sop_class = str(good.SOPClassUID)
    for mode in ("strict-read", "dciodvfy"):
        encode_checked(good, sop_class, mode)
    for keyword, vr, value, strict_rejects in _BAD_VALUES:
        bad = copy.deepcopy(good)
        raw = value.encode("latin-1").ljust(len(value) + len(value) % 2)
        tag = Tag(keyword)
        bad._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
        with pytest.raises(OutputError, match=rf"dciodvfy.*{keyword}"):
            encode_checked(bad, sop_class, "dciodvfy")
        if strict_rejects:
            with pytest.raises(OutputError, match=keyword):
                encode_checked(bad, sop_class, "strict-read")
        else:
            encode_checked(bad, sop_class, "strict-read")  # what dciodvfy adds


@needs_dcmtk
def test_results_wait_for_a_destination_that_is_down_then_go(
    phantom_study: tuple, tmp_path: Path
) -> None:
    port = free_port()
    settings = make_settings(
        phantom_study[0].data_dir,
        destinations={"pacs": {"host": "127.0.0.1", "port": port, "ae_title": "STORESCP"}},
    )
    files = sorted(
        str(p.relative_to(settings.results_dir)) for p in settings.results_dir.rglob("*.dcm")
    )
    # Each model's SR and KOS, the SEG and a key image per lesion, the classifier's key image.
    made = [json.loads(p.read_text()) for p in settings.results_dir.rglob("result.json")]
    assert len(files) == sum(len(doc["dicom"]) for doc in made) >= 7
    delivery = Delivery(job_id="job1", destination="pacs", files=files)
    down = deliver(settings, delivery)
    assert sorted(down.pending) == files and not down.sent and not down.refused
    received = tmp_path / "pacs"
    received.mkdir()
    log = tmp_path / "storescp.log"
    with log.open("w") as out:
        storescp = subprocess.Popen(
            [
                "storescp",
                "-v",
                "-aet",
                "STORESCP",
                "-od",
                str(received),
                "--sort-on-study-uid",
                "st",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        time.sleep(1.0)
        up = deliver(settings, delivery)
        assert sorted(up.sent) == files and not up.pending and not up.refused
        # The job done again (its worker lost after sending) sends nothing the PACS has.
        again = deliver(settings, delivery)
        assert not again.sent and not again.pending and not again.refused
    finally:
        storescp.terminate()
        storescp.wait(10)
    got = {dcmread(p).SOPInstanceUID for p in received.rglob("*") if p.is_file()}
    assert got == {dcmread(settings.results_dir / f).SOPInstanceUID for f in files}
    assert log.read_text().count("Received Store Request") == len(files)


def test_a_delivery_naming_files_outside_results_is_refused_and_recorded(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path / "data",
        destinations={"pacs": {"host": "127.0.0.1", "port": free_port(), "ae_title": "PACS"}},
    )
    settings.ensure_dirs()
    (tmp_path / "secret.dcm").write_bytes(b"x")
    outcome = deliver(
        settings,
        Delivery(job_id="j", destination="pacs", files=["../../secret.dcm", "gone/sr.dcm"]),
    )
    assert outcome.refused == {
        "../../secret.dcm": "not a file in the results folder",
        "gone/sr.dcm": "no longer in the results folder",
    }
    folder = record_failure(
        settings, Delivery(job_id="j", destination="pacs", files=[]), outcome.refused
    )
    assert folder == settings.failed_dir / "j.send-pacs"
    assert "no longer in the results folder" in (folder / "error.json").read_text()


def test_an_input_without_dicom_identity_gets_an_sr_of_its_own(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """A PNG has no patient or study: the SR stands in a study of its own, patient unknown,
    its label in the private coding scheme."""
    from pipeline.core.jobs import spool_file
    from pipeline.demo.synthetic import write_mednist_png
    from pipeline.studies.file_job import run_job

    settings = _settings(tmp_path)
    settings.ensure_dirs()
    write_mednist_png(settings.inbox_dir / "hand.png", "Hand", TEST_SEED_BASE + 612)
    job = spool_file(settings.inbox_dir / "hand.png", settings.inbox_dir, settings.spool_dir)
    client = new_client(triton.grpc, settings.triton)
    run_job(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)
    sr = dcmread(settings.results_dir / job.id / "mednist_classifier" / "sr.dcm")
    assert sr.PatientID == "" and sr.PatientName == ""
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    (evaluation,) = _named(sr, "DCM", "121071")
    assert _code(evaluation, "ConceptCodeSequence") == (PRIVATE_SCHEME, "Hand")


def _real_study(tmp_path: Path, path: Path, **changes: str) -> Path:
    """A vendor's file as sent, in a folder of its own (attributes changed as a PACS would
    have them)."""
    ds = dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    folder = tmp_path / path.stem
    folder.mkdir()
    ds.save_as(folder / path.name)
    return folder


def test_a_source_of_a_retired_sop_class_keeps_its_answer(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """A real ultrasound of the retired Ultrasound Image Storage class (pydicom-data's
    color-px.dcm): highdicom cannot reference it, so no SR is made; the answer is written with
    a clear warning, and nothing fails."""
    import data_store

    source = Path(data_store.__file__).parent / "data" / "color-px.dcm"
    settings = _settings(tmp_path)
    job = read_job(settings.spool_dir / spool_study(settings, [_real_study(tmp_path, source)]))
    client = new_client(triton.grpc, settings.triton)
    run_study(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)
    [path] = (settings.results_dir / str(dcmread(source).StudyInstanceUID)).rglob("result.json")
    doc = json.loads(path.read_text())
    assert doc["prediction"]["label"] and doc["dicom"] == []
    [issue] = doc["dicom_issues"]
    assert issue["file"] == "sr.dcm" and not issue["written"]
    assert "1.2.840.10008.5.1.4.1.1.6 (Ultrasound Image Storage) is retired" in issue["not_made"]
    assert not any(settings.failed_dir.iterdir())


@pytest.mark.skipif(IOD_CHECK != "dciodvfy", reason="dicom3tools is not installed")
def test_a_study_uid_under_an_illegal_root_keeps_its_answer_and_its_sr(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """pydicom's MR_small.dcm, its study UID under a root no registry gives (9.): the SR must
    carry the study's UID, so fails its IOD check for it; written, flagged as inherited."""
    study_uid = "9.9.9.1"
    folder = _real_study(tmp_path, PYDICOM_FILES / "MR_small.dcm", StudyInstanceUID=study_uid)
    settings = _settings(tmp_path)
    job = read_job(settings.spool_dir / spool_study(settings, [folder]))
    client = new_client(triton.grpc, settings.triton)
    run_study(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)
    [path] = (settings.results_dir / study_uid).rglob("result.json")
    doc = json.loads(path.read_text())
    # The SR, and the KOS flagging it (a route's default outputs), carry the study's UID.
    assert doc["dicom"] == ["sr.dcm", "kos.dcm"] and (path.parent / "sr.dcm").is_file()
    assert [issue["file"] for issue in doc["dicom_issues"]] == ["sr.dcm", "kos.dcm"]
    for issue in doc["dicom_issues"]:
        assert issue["written"] and issue["own"] == [], issue
        assert all("Illegal root for UID" in e for e in issue["inherited"]), issue
    assert dcmread(path.parent / "sr.dcm").StudyInstanceUID == study_uid
    assert not any(settings.failed_dir.iterdir())
