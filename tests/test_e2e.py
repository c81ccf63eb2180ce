"""End to end, as a user runs it: `dicom-pipeline up`, files dropped into the inbox, studies
sent by C-STORE and STOW-RS, results.

Everything is real: the embedded redis-server, the tritonserver on CPU, a Celery worker, the
watchdog watcher. The test owns the data folder and every process it starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread

from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.synthetic import (
    MEDNIST_LABELS,
    lesion_phantom,
    write_ct_nifti,
    write_mednist_png,
)
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.runtime.process import descendants, free_port
from pipeline.tasks import broker
from pipeline.tasks.app import make_celery

from .conftest import alive, running_up, up_env, wait_for

pytestmark = pytest.mark.e2e


def _by_input_name(root: Path, pattern: str, section: str) -> dict[str, dict[str, Any]]:
    """The JSON documents under ``root``, keyed by the inbox name their ``section`` records."""
    docs = [json.loads(f.read_text()) for f in root.glob(pattern)]
    key = "name" if section == "input" else "original_name"
    return {doc[section][key]: doc for doc in docs}


def _worker_pings(data: Path) -> list[dict[str, Any]]:
    """The answers of the workers on ``data``'s embedded Redis to a Celery ping."""
    settings = Settings(data_dir=data)
    app = make_celery(settings, broker.broker_url(settings))
    try:
        return list(app.control.ping(timeout=2.0))
    finally:
        app.close()


def test_inbox_to_results_through_real_services(model_repository: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    dicom_port = free_port()
    pacs_port = free_port()
    # The default rules, but a CT study's DICOM results also go to a PACS (a dcmtk storescp,
    # started only once the results exist: down first, up later).
    (tmp_path / "config.yaml").write_text(
        f"""
destinations:
  pacs: {{host: 127.0.0.1, port: {pacs_port}, ae_title: PACS, retry_backoff_max_s: 2}}
routes:
  - name: ct-volume
    match: {{kind: [dicom], modality: [CT], min_slices: 16}}
    models: [ct_covid_classifier, ct_lesion_segmentation]
    send_to: [pacs]
  - name: nifti-volume
    match: {{kind: [nifti]}}
    models: [ct_covid_classifier, ct_lesion_segmentation]
  - name: 2d-image
    match: {{kind: [image, dicom], max_slices: 1}}
    models: [mednist_classifier]
"""
    )
    stow_port = free_port()
    env = up_env(tmp_path, model_repository, dicom_port)
    env["PIPELINE_RECEIVER__DICOMWEB_PORT"] = str(stow_port)
    with running_up(tmp_path, env) as up:
        up_log = (tmp_path / "up.log").read_text()
        assert str((data / "inbox").resolve()) in up_log
        assert f"STOW-RS: http://127.0.0.1:{stow_port}/studies" in up_log
        # A clean start logs no errors (the receiver's readiness probe once logged each
        # refused connection at ERROR).
        assert " ERROR " not in up_log, up_log
        # "ready" means a study sent now is taken at once: the worker already answers.
        assert _worker_pings(data), "`up` said ready before its worker took jobs"
        # ... and warmed up: the first study does not pay the libraries' first-use costs.
        ready_log = (data / "run" / "logs" / "worker.log").read_text()
        assert "worker warmed up in" in ready_log
        # ... and what it loaded is out of the pool processes' garbage collector's way.
        assert "objects frozen for the pool processes' garbage collector" in ready_log
        inbox = data / "inbox"
        expected: dict[str, tuple[str, str]] = {}
        for k, label in enumerate(MEDNIST_LABELS):
            write_mednist_png(inbox / f"{label}.png", label, TEST_SEED_BASE + 200 + k)
            expected[f"{label}.png"] = ("mednist_classifier", label)
        (inbox / "ward3").mkdir()
        write_ct_nifti(tmp_path / "pos.nii.gz", True, TEST_SEED_BASE + 300)
        os.replace(tmp_path / "pos.nii.gz", inbox / "ward3" / "pos.nii.gz")
        expected["ward3/pos.nii.gz"] = ("ct_covid_classifier", "COVID Positive")
        write_ct_nifti(inbox / "neg.nii.gz", False, TEST_SEED_BASE + 301)
        expected["neg.nii.gz"] = ("ct_covid_classifier", "COVID Negative")
        # Bad inputs: a truncated NIfTI and a text file named .png; and a partial download.
        good = (inbox / "neg.nii.gz").read_bytes()
        (inbox / "truncated.nii.gz").write_bytes(good[: len(good) // 3])
        (inbox / "notes.png").write_text("not an image")
        (inbox / "incoming.png.part").write_bytes(b"still downloading")

        def results() -> dict[str, dict[str, Any]]:
            """Classification results by input name (segmentations are checked apart)."""
            return _by_input_name(data / "results", "*/[!c]*/result.json", "input") | (
                _by_input_name(data / "results", "*/ct_covid_classifier/result.json", "input")
            )

        def failed() -> dict[str, dict[str, Any]]:
            return _by_input_name(data / "failed", "*/error.json", "job")

        wait_for(
            lambda: len(results()) >= len(expected) and len(failed()) >= 2,
            180,
            "results and failures",
        )
        # A good file dropped after the bad ones still gets its result.
        write_mednist_png(inbox / "late.png", "Hand", TEST_SEED_BASE + 400)
        expected["late.png"] = ("mednist_classifier", "Hand")
        wait_for(lambda: "late.png" in results(), 60, "the late file's result")

        got = results()
        assert set(got) == set(expected)
        # The embedded Triton computes on this machine's CPU: the pool processes leave it
        # the other cores (one torch thread each).
        worker_log = (data / "run" / "logs" / "worker.log").read_text()
        assert "computes with 1 torch thread(s)" in worker_log
        for name, (model, label) in expected.items():
            doc = got[name]
            assert doc["model"]["name"] == model and doc["prediction"]["label"] == label, doc
            assert doc["schema_version"] == "1.6" and doc["timings"]["inference_ms"] > 0
        bad = failed()
        assert {"truncated.nii.gz", "notes.png"} <= set(bad)
        assert "not a readable NIfTI" in str(bad["truncated.nii.gz"]["message"])
        assert "not a readable PNG/JPEG" in str(bad["notes.png"]["message"])
        for name in ("truncated.nii.gz", "notes.png"):
            doc = bad[name]
            assert doc["stage"] == "load"
            # The input is kept beside its error.
            assert (data / "failed" / str(doc["job"]["id"]) / Path(name).name).is_file()
        assert (inbox / "incoming.png.part").exists()  # never taken while being written

        # NIfTI CTs are also segmented (the default route names both models).
        for name in ("ward3/pos.nii.gz", "neg.nii.gz"):
            job_id = got[name]["job_id"]
            seg = data / "results" / job_id / "ct_lesion_segmentation" / "result.json"
            wait_for(seg.exists, 60, f"the segmentation of {name}")  # written after the class
            assert json.loads(seg.read_text())["segmentation"]["mask"] == "mask.nii.gz"
            # No DICOM source: an SR of its own, the patient unknown.
            assert dcmread(seg.parent / "sr.dcm").PatientID == ""

        # A CT study sent by DICOM C-STORE: received, completed on association release,
        # routed by the default rules, its series made a volume, classified and segmented;
        # the lesion mask, read back from its file, matches the phantom's ground truth.
        hu, truth, affine = lesion_phantom(TEST_SEED_BASE + 700, lesions=2)
        spec = write_volume_series(tmp_path / "study", hu.astype("float32"), affine)
        sent = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "send",
                str(tmp_path / "study"),
                "--port",
                str(dicom_port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        study_dir = data / "results" / spec.study_uid
        wait_for((study_dir / "study.json").exists, 180, "the DICOM study's results")
        covid = study_dir / "ct_covid_classifier" / spec.series_uid / "result.json"
        doc = json.loads(covid.read_text())
        assert doc["input"]["source"] == "dicom" and doc["input"]["route"] == "ct-volume"
        seg_dir = study_dir / "ct_lesion_segmentation" / spec.series_uid
        mask = np.asarray(nib.load(seg_dir / "mask.nii.gz").dataobj) > 0
        dice = 2 * (mask & (truth > 0)).sum() / (mask.sum() + (truth > 0).sum())
        assert dice >= 0.8, dice
        seg_doc = json.loads((seg_dir / "result.json").read_text())
        true_ml = float(truth.sum()) * float(np.prod(np.diag(affine)[:3])) / 1000.0
        assert abs(seg_doc["segmentation"]["total_volume_ml"] - true_ml) <= 0.1 * true_ml
        study = json.loads((study_dir / "study.json").read_text())
        assert [s["status"] for s in study["series"]] == ["done"]
        assert study["calling_aet"] == "PIPELINE_SCU"

        # Its objects were due at the PACS, which was down; now it comes up and gets them:
        # each model's SR, key images and KOS (the route's default outputs), the lesions' SEG.
        made = {dcmread(p).SOPInstanceUID for p in study_dir.rglob("*.dcm")}
        listed = [json.loads(p.read_text())["dicom"] for p in study_dir.rglob("result.json")]
        assert len(made) == sum(len(names) for names in listed) >= 7
        if shutil.which("storescp"):  # dcmtk: .ci/run installs it
            pacs_dir = tmp_path / "pacs"
            pacs_dir.mkdir()
            pacs = subprocess.Popen(
                ["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_for(
                    lambda: len(list(pacs_dir.iterdir())) >= len(made), 60, "the PACS to get them"
                )
                time.sleep(0.5)  # storescp renames each file once complete
                at_pacs = {dcmread(p).SOPInstanceUID for p in pacs_dir.iterdir()}
                assert at_pacs == made
                worker_log = (data / "run" / "logs" / "worker.log").read_text()
                assert f"pacs unavailable, {len(made)} file(s) to send; retry 1" in worker_log
            finally:
                pacs.terminate()
                pacs.wait(10)

        # A CT study stored by DICOMweb STOW-RS (a real client, as a viewer or archive sends
        # it): the same way through, with no calling AE title.
        hu, _, affine = lesion_phantom(TEST_SEED_BASE + 701, lesions=1)
        web = write_volume_series(tmp_path / "web-study", hu.astype("float32"), affine)
        client = DICOMwebClient(f"http://127.0.0.1:{stow_port}")
        answer = client.store_instances([dcmread(p) for p in (tmp_path / "web-study").iterdir()])
        assert len(answer.ReferencedSOPSequence) == hu.shape[2]
        web_dir = data / "results" / web.study_uid
        wait_for((web_dir / "study.json").exists, 180, "the STOW-RS study's results")
        web_study = json.loads((web_dir / "study.json").read_text())
        assert [s["status"] for s in web_study["series"]] == ["done"]
        assert web_study["calling_aet"] is None
        web_covid = web_dir / "ct_covid_classifier" / web.series_uid / "result.json"
        assert json.loads(web_covid.read_text())["input"]["route"] == "ct-volume"

        def spooled() -> list[Path]:
            return [p for p in (data / "spool").iterdir() if not p.name.startswith(".")]

        # study.json is written just before the study's input moves to the archive.
        wait_for(lambda: not spooled(), 30, "the spool to empty")
        assert not any((data / "results").rglob("*.tmp"))

        children = descendants(up.pid)
        assert len(children) >= 3  # redis, triton (+ stubs), worker (+ pool)
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
    wait_for(lambda: not any(alive(p) for p in children), 10, "children to exit")
