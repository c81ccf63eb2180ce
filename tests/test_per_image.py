"""Series of several 2D images (radiograph views, secondary captures) are classified image by
image: one result per model and series lists every image's answer, its SR a finding per image
referencing that image; multi-frame cine loops stay out unless a rule asks for them. On real
vendors' files: pydicom's dcmtk-encoded secondary captures of one series, and two of
pydicom-data's computed radiographs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import data_store
import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate

from pipeline.core.contract import discover_contracts
from pipeline.core.jobs import read_job
from pipeline.core.results import Prediction, Result
from pipeline.core.routing import DEFAULT_ROUTES, Match, Route
from pipeline.core.settings import Settings
from pipeline.inference.decide import decide_series
from pipeline.inference.triton_client import TritonClient
from pipeline.ops.status import snapshot
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.studies.models import Models
from pipeline.studies.steps import StageError
from pipeline.studies.study_job import run_study

from .conftest import MODEL_REPOSITORY, make_settings, spool_study

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA = Path(data_store.__file__).parent / "data"
# Secondary captures of one series, each its own instance, as dcmtk encoded them.
CAPTURES = (
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",
)
IOD_CHECK = "dciodvfy" if shutil.which("dciodvfy") else "strict-read"


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        output={"iod_check": IOD_CHECK},
        **overrides,
    )


def _run(settings: Settings, folder: Path, client: TritonClient) -> list[Path]:
    job = read_job(settings.spool_dir / spool_study(settings, [folder]))
    return run_study(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)


def _result(written: list[Path]) -> tuple[Path, Result]:
    [path] = [p for p in written if p.name == "result.json"]
    return path.parent, Result.model_validate_json(path.read_text())


def _sr_groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The SR's measurement groups (TID 1501), in order."""
    [measurements] = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"
    ]
    return list(measurements.ContentSequence)


def _referenced(group: pydicom.Dataset) -> list[str]:
    return [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in group.ContentSequence
        if item.ValueType == "IMAGE"
    ]


def test_a_series_of_secondary_captures_gets_an_answer_per_image(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    folder = tmp_path / "captures"
    folder.mkdir()
    uids = []
    for name in CAPTURES:
        shutil.copy(PYDICOM_FILES / name, folder / name)
        uids.append(str(dcmread(folder / name, stop_before_pixels=True).SOPInstanceUID))
    settings = _settings(tmp_path)
    written = _run(settings, folder, new_client(triton.grpc, settings.triton))
    out, doc = _result(written)
    assert out.parent.name == "mednist_classifier" and doc.input.route == "2d-image"
    # Every image answered, by its instance (same InstanceNumber: then by SOP Instance UID).
    assert [a.sop_instance_uid for a in doc.images] == sorted(uids)
    contract = discover_contracts(MODEL_REPOSITORY)["mednist_classifier"]
    for answer in doc.images:
        assert answer.frame is None and answer.shape == [1, 100, 100]
        assert sum(answer.prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert doc.prediction == decide_series(contract, [a.prediction for a in doc.images])
    # The SR: the series' finding drawn from all five, then one finding per image.
    # (and the KOS flagging it: the route's default outputs; no key image image by image)
    assert doc.dicom == ["sr.dcm", "kos.dcm"] and not [i for i in doc.dicom_issues if i.own]
    sr = dcmread(out / "sr.dcm")
    groups = _sr_groups(sr)
    assert len(groups) == 1 + len(uids)
    assert sorted(_referenced(groups[0])) == sorted(uids)
    assert [_referenced(g) for g in groups[1:]] == [[a.sop_instance_uid] for a in doc.images]
    assert (out / "preview.png").stat().st_size > 0
    study = json.loads((settings.results_dir / str(sr.StudyInstanceUID) / "study.json").read_text())
    [series] = study["series"]
    assert (series["status"], series["route"], series["slices"]) == ("done", "2d-image", 5)
    # The status page says what the single label does not.
    [row] = snapshot(settings).results
    assert row.findings.startswith("5 images: ")


def test_two_radiographs_of_one_series_are_each_classified(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """Two real computed radiographs (MONOCHROME1, 1955x1841 and 1760x1760, no position in
    the patient) made the two images of one CR series, as a PA and a lateral view are."""
    folder = tmp_path / "cr"
    folder.mkdir()
    first = dcmread(PYDICOM_DATA / "RG1_UNCR.dcm")
    second = dcmread(PYDICOM_DATA / "RG3_UNCR.dcm")
    second.StudyInstanceUID, second.SeriesInstanceUID = (
        first.StudyInstanceUID,
        first.SeriesInstanceUID,
    )
    second.InstanceNumber = 2
    first.save_as(folder / "1.dcm")
    second.save_as(folder / "2.dcm")
    settings = _settings(tmp_path)
    written = _run(settings, folder, new_client(triton.grpc, settings.triton))
    out, doc = _result(written)
    assert [(a.sop_instance_uid, a.instance_number) for a in doc.images] == [
        (first.SOPInstanceUID, 1),
        (second.SOPInstanceUID, 2),
    ]
    assert [a.shape for a in doc.images] == [[1, 1955, 1841], [1, 1760, 1760]]
    assert doc.dicom == ["sr.dcm", "kos.dcm"]
    assert len(_sr_groups(dcmread(out / "sr.dcm"))) == 3


def test_cine_loops_stay_out_unless_a_rule_asks_for_their_frames(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """A real 30-frame ultrasound loop: the default 2D rule leaves it unrouted; a rule for US
    loops taken image by image answers each frame, and its SR references each by number."""
    folder = tmp_path / "us"
    folder.mkdir()
    shutil.copy(PYDICOM_FILES / "examples_ybr_color.dcm", folder / "loop.dcm")
    settings = _settings(tmp_path)
    client = new_client(triton.grpc, settings.triton)
    assert _run(settings, folder, client) == []  # set aside, not failed
    assert not any(settings.failed_dir.iterdir())
    loops = Route(
        name="us-frames",
        match=Match(kind=("dicom",), modality=("US",)),
        models=("mednist_classifier",),
        per_image=True,
    )
    settings = _settings(tmp_path / "again", routes=(loops, *DEFAULT_ROUTES))
    out, doc = _result(_run(settings, folder, client))
    uid = str(dcmread(folder / "loop.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert [(a.sop_instance_uid, a.frame) for a in doc.images] == [(uid, n) for n in range(1, 31)]
    assert {tuple(a.shape) for a in doc.images} == {(1, 240, 320)}
    frames = [
        item.ReferencedSOPSequence[0].ReferencedFrameNumber
        for group in _sr_groups(dcmread(out / "sr.dcm"))[1:]
        for item in group.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert frames == list(range(1, 31))


def test_an_unreadable_image_costs_the_others_nothing(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """One capture's JPEG stream overwritten: the four others are answered and written, then
    the series fails naming the one, its files kept with the failed item."""
    folder = tmp_path / "captures"
    folder.mkdir()
    for name in CAPTURES:
        shutil.copy(PYDICOM_FILES / name, folder / name)
    broken = dcmread(folder / CAPTURES[1])
    broken.PixelData = encapsulate([b"\xff\xd8" + bytes(600)])  # a JPEG start, then zeros
    broken.save_as(folder / CAPTURES[1])
    settings = _settings(tmp_path)
    job = read_job(settings.spool_dir / spool_study(settings, [folder]))
    models = Models(discover_contracts(MODEL_REPOSITORY))
    with pytest.raises(StageError, match=str(broken.SOPInstanceUID)):
        run_study(job, settings, models, new_client(triton.grpc, settings.triton))
    [path] = settings.results_dir.rglob("result.json")
    doc = Result.model_validate_json(path.read_text())
    assert len(doc.images) == 4
    assert broken.SOPInstanceUID not in {a.sop_instance_uid for a in doc.images}


def test_a_series_answer_is_drawn_from_its_images() -> None:
    """Softmax: the label of the images' mean probabilities; sigmoid: the image most likely
    positive, so one positive view makes the series positive."""
    contracts = discover_contracts(MODEL_REPOSITORY)
    mednist = contracts["mednist_classifier"]
    labels = mednist.labels
    one_hot = [
        dict.fromkeys(labels, 0.0) | {labels[i]: p, labels[5]: 1 - p}
        for i, p in ((2, 0.6), (2, 0.7), (4, 0.9))
    ]
    answers = [Prediction(label=max(p, key=p.__getitem__), probabilities=p) for p in one_hot]
    series = decide_series(mednist, answers)
    assert series.label == labels[2]  # mean: CXR 0.433 ahead of Hand 0.3 and HeadCT 0.267
    assert series.probabilities[labels[2]] == pytest.approx(1.3 / 3, abs=1e-5)
    covid = contracts["ct_covid_classifier"]
    negative, positive = covid.labels
    views = [
        Prediction(label=negative, probabilities={negative: 0.9, positive: 0.1}),
        Prediction(label=positive, probabilities={negative: 0.2, positive: 0.8}),
    ]
    assert decide_series(covid, views) is views[1]
    assert np.isclose(decide_series(covid, views[:1]).probabilities[positive], 0.1)


def test_infer_command_answers_each_image_of_a_series(
    triton: TritonEndpoints, tmp_path: Path
) -> None:
    """`dicom-pipeline infer` on the captures' folder: one answer per image, named by file."""
    folder = tmp_path / "captures"
    folder.mkdir()
    for name in CAPTURES:
        shutil.copy(PYDICOM_FILES / name, folder / name)
    env = {
        **os.environ,
        "PIPELINE_DATA_DIR": str(tmp_path / "data"),
        "PIPELINE_TRITON__URL": triton.grpc,
        "PIPELINE_CONFIG": str(tmp_path / "none.yaml"),  # the default rules
    }
    (tmp_path / "none.yaml").write_text("{}\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "infer", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    assert sorted(x["instance"] for x in lines) == sorted(CAPTURES), lines
    assert {(x["model"], x["route"]) for x in lines} == {("mednist_classifier", "2d-image")}
    assert len({x["series"] for x in lines}) == 1
