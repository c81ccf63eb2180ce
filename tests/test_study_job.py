"""Routing rules, `route --explain`, and a received DICOM study processed by the worker code
against the real tritonserver."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from pydicom.fileset import FileSet

from pipeline.core.contract import discover_contracts
from pipeline.core.jobs import JOB_FILE, Job
from pipeline.core.routing import DEFAULT_ROUTES, Match, Route, SeriesFacts, decide, mismatches
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import new_series, write_series, write_volume_series
from pipeline.demo.synthetic import ct_volume, write_mednist_png
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.triton_client import TritonClient
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.studies.models import Models
from pipeline.studies.steps import StageError
from pipeline.studies.study_job import run_study

from .conftest import MODEL_REPOSITORY, make_settings, spool_study, store_files

CT = SeriesFacts(kind="dicom", slices=120, modality="CT", series_description="Thorax 1.0 B30f")


def test_first_matching_rule_wins_and_every_miss_is_explained() -> None:
    routes = (
        Route(name="mr", match=Match(modality=("MR",)), models=("a",)),
        Route(
            name="thin-chest",
            match=Match(modality=("ct",), series_description=r"thorax.*b30", min_slices=100),
            models=("b",),
        ),
        Route(name="any-ct", match=Match(modality=("CT",)), models=("c",)),
    )
    decision = decide(routes, CT)
    assert decision.route is not None and decision.route.name == "thin-chest"
    assert decision.why_not == {"mr": ["modality CT not in ['MR']"]}
    few = SeriesFacts(kind="dicom", slices=40, modality="CT", series_description="Thorax")
    assert [m for m in mismatches(routes[1].match, few)] == [
        "series description 'Thorax' does not match /thorax.*b30/",
        "40 slice(s) < 100",
    ]
    assert decide(routes, few).route == routes[2]


def test_ae_titles_route_too() -> None:
    rule = Route(name="from-ct01", match=Match(calling_aet=("CT01",)), models=("x",))
    assert decide((rule,), SeriesFacts(kind="dicom", slices=1, calling_aet="CT01")).route
    other = decide((rule,), SeriesFacts(kind="dicom", slices=1, calling_aet="MR02"))
    assert other.route is None
    assert other.why_not["from-ct01"] == ["calling AE title MR02 not in ['CT01']"]


def test_bad_routes_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="unique"):
        Settings(routes=(DEFAULT_ROUTES[0], DEFAULT_ROUTES[0]))
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        Route.model_validate({"name": "r", "match": {"series_description": "("}, "models": ["a"]})
    with pytest.raises(ValidationError):
        Route.model_validate({"name": "r", "models": []})


def _study_with_ct_and_an_unrouted_series(tmp_path: Path) -> tuple[list[Path], str, str, str]:
    vol, affine = ct_volume(True, TEST_SEED_BASE + 500)
    ct = write_volume_series(tmp_path / "ct", vol.astype(np.float32), affine)
    other = new_series(3, 16, 16, study_uid=ct.study_uid)
    write_series(tmp_path / "other", other)
    from pydicom import dcmread

    for path in (tmp_path / "other").iterdir():  # a 3-slice MR series: no rule for it
        ds = dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    return [tmp_path / "ct", tmp_path / "other"], ct.study_uid, ct.series_uid, other.series_uid


def test_route_explain_names_the_rule_for_each_series(tmp_path: Path) -> None:
    folders, _, ct_series, mr_series = _study_with_ct_and_an_unrouted_series(tmp_path)
    (tmp_path / "none.yaml").write_text("{}\n")  # the default rules, whatever config/ says
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "route", "--explain", *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PIPELINE_CONFIG": str(tmp_path / "none.yaml")},
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    ct_block = text.split(f"series {ct_series}")[1].split("series ")[0]
    assert "-> ct-volume: ct_covid_classifier" in ct_block
    slices = len(list(folders[0].iterdir()))
    assert "2d-image: no (a volume)" in ct_block and f"{slices} slice(s)" in ct_block
    mr_block = text.split(f"series {mr_series}")[1]
    assert "-> skipped: no rule matches" in mr_block
    assert "modality MR not in ['CT']" in mr_block


def test_route_passes_over_the_other_files_of_a_dicom_medium(tmp_path: Path) -> None:
    """A CD's copy, as a folder and as a zip: its series is routed; its DICOMDIR, README and a
    viewer's icon (a PNG that would be routed as a hand or a chest) are named as no image to
    route."""
    cd = tmp_path / "cd"
    medium = FileSet()
    for path in write_series(cd / "DICOM", spec := new_series(3, 16, 16)):
        medium.add(path)
    medium.write(tmp_path / "fileset")
    shutil.copy(tmp_path / "fileset" / "DICOMDIR", cd / "DICOMDIR")
    (cd / "README.TXT").write_text("run VIEWER.EXE")
    (cd / "VIEWER").mkdir()
    write_mednist_png(cd / "VIEWER" / "logo.png", "Hand", TEST_SEED_BASE + 501)
    shutil.make_archive(str(tmp_path / "cd"), "zip", cd)  # and the same CD as a download
    for given in (cd, tmp_path / "cd.zip"):
        out = subprocess.run(
            [sys.executable, "-m", "pipeline", "route", str(given)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert f"series {spec.series_uid}" in out.stdout
        assert "file logo.png" not in out.stdout
        for name in ("DICOMDIR", "README.TXT", "logo.png"):
            assert f"not an image to route: {name}: " in out.stdout, out.stdout


def test_received_study_routed_processed_and_recorded(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    folders, study_uid, ct_series, mr_series = _study_with_ct_and_an_unrouted_series(tmp_path)
    settings = make_settings(tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY})
    job_id = spool_study(settings, folders)
    from pipeline.core.jobs import read_job

    job = read_job(settings.spool_dir / job_id)
    models = Models(discover_contracts(MODEL_REPOSITORY))
    client = new_client(triton.grpc, settings.triton)
    written = run_study(job, settings, models, client)
    out = settings.results_dir / study_uid
    result = json.loads((out / "ct_covid_classifier" / ct_series / "result.json").read_text())
    assert result["prediction"]["label"] == "COVID Positive"
    assert result["input"]["series_uid"] == ct_series and result["input"]["route"] == "ct-volume"
    assert result["input"]["shape"] == [1, *ct_volume(True, TEST_SEED_BASE + 500)[0].shape]
    study = json.loads((out / "study.json").read_text())
    by_uid = {s["series_uid"]: s for s in study["series"]}
    assert by_uid[ct_series]["status"] == "done"
    assert by_uid[mr_series]["status"] == "skipped"
    assert "modality MR not in ['CT']" in by_uid[mr_series]["reason"]
    assert study["calling_aet"] == "CT01"
    assert len(written) == _files_expected(out, ct_series)
    # The input left the spool for the archive; running it again is a no-op.
    assert not (settings.spool_dir / job_id).exists()
    assert (settings.archive_dir / job_id / JOB_FILE).exists()
    assert run_study(job, settings, models, client) == []


def test_a_broken_series_fails_the_job_but_not_the_other_series(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    folders, study_uid, ct_series, _ = _study_with_ct_and_an_unrouted_series(tmp_path)
    broken = new_series(20, 16, 16, study_uid=study_uid)
    paths = write_series(tmp_path / "gap", broken)
    paths[10].unlink()  # a missing slice
    settings = make_settings(tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY})
    from pipeline.core.jobs import read_job

    job = read_job(settings.spool_dir / spool_study(settings, [*folders, tmp_path / "gap"]))
    client = new_client(triton.grpc, settings.triton)
    with pytest.raises(StageError, match="irregular slice spacing") as err:
        run_study(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)
    assert err.value.stage == "series"
    out = settings.results_dir / study_uid
    assert (out / "ct_covid_classifier" / ct_series / "result.json").exists()
    study = json.loads((out / "study.json").read_text())
    failed = [s for s in study["series"] if s["status"] == "failed"]
    assert [s["series_uid"] for s in failed] == [broken.series_uid]
    assert (settings.spool_dir / job.id / "study").is_dir()  # kept for the failed/ move


def test_lesion_phantom_segmented_through_triton_matches_its_ground_truth(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    import nibabel as nib

    from pipeline.core.jobs import read_job
    from pipeline.demo.synthetic import lesion_phantom

    hu, truth, affine = lesion_phantom(TEST_SEED_BASE + 600, lesions=3)
    spec = write_volume_series(tmp_path / "ct", hu.astype(np.float32), affine)
    settings = make_settings(tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY})
    job = read_job(settings.spool_dir / spool_study(settings, [tmp_path / "ct"]))
    client = new_client(triton.grpc, settings.triton)
    run_study(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)
    out = settings.results_dir / spec.study_uid / "ct_lesion_segmentation" / spec.series_uid
    doc = json.loads((out / "result.json").read_text())
    mask_img = nib.load(out / doc["segmentation"]["mask"])
    # The mask is read back from its file, on the source's voxels and affine.
    np.testing.assert_allclose(mask_img.affine, affine, atol=1e-4)
    mask = np.asarray(mask_img.dataobj) > 0
    assert mask.shape == truth.shape
    dice = 2 * (mask & (truth > 0)).sum() / (mask.sum() + (truth > 0).sum())
    assert dice >= 0.8, dice
    true_ml = float(truth.sum()) * float(np.prod(np.diag(affine)[:3])) / 1000.0
    assert abs(doc["segmentation"]["total_volume_ml"] - true_ml) <= 0.1 * true_ml
    assert doc["prediction"]["label"] == "lesion" and doc["segmentation"]["patches"] > 1
    assert 1 <= len(doc["segmentation"]["lesions"]) <= 4
    from PIL import Image

    rgb = np.asarray(Image.open(out / doc["preview"]).convert("RGB")).astype(int)
    assert ((rgb[..., 0] - rgb[..., 1]) > 80).sum() > 20  # the lesion, overlaid in red


def test_a_late_instance_joins_its_series_from_the_earlier_round(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """A new round (instances that came after the study was handed over) is processed with
    the series' earlier instances, not alone; series it does not touch keep their results."""
    from pipeline.core.jobs import read_job

    folders, study_uid, ct_series, mr_series = _study_with_ct_and_an_unrouted_series(tmp_path)
    ct_files = sorted(folders[0].iterdir())
    first = tmp_path / "first"
    first.mkdir()
    for path in ct_files[:-1]:  # round 1: all but the last slice
        (first / path.name).write_bytes(path.read_bytes())
    settings = make_settings(tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY})
    models = Models(discover_contracts(MODEL_REPOSITORY))
    client = new_client(triton.grpc, settings.triton)
    round1 = read_job(settings.spool_dir / spool_study(settings, [first, folders[1]]))
    run_study(round1, settings, models, client)
    late = tmp_path / "late"
    late.mkdir()
    (late / ct_files[-1].name).write_bytes(ct_files[-1].read_bytes())
    round2 = read_job(settings.spool_dir / spool_study(settings, [late]))
    assert round2.study is not None and round2.study.instances == 1
    run_study(round2, settings, models, client)
    out = settings.results_dir / study_uid
    result = json.loads((out / "ct_covid_classifier" / ct_series / "result.json").read_text())
    assert result["job_id"] == round2.id
    assert result["input"]["shape"][-1] == len(ct_files)  # the whole series, late slice too
    study = json.loads((out / "study.json").read_text())
    assert study["rounds"] == [round1.id, round2.id]
    by_uid = {s["series_uid"]: s for s in study["series"]}
    assert by_uid[ct_series]["status"] == "done" and by_uid[ct_series]["slices"] == len(ct_files)
    assert by_uid[mr_series]["status"] == "skipped"  # kept from round 1


def _copy(files: list[Path], folder: Path) -> Path:
    folder.mkdir()
    for path in files:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _files_expected(out: Path, ct_series: str) -> int:
    """The covid model's result, preview, SR, key image and KOS; the lesion model's mask,
    preview, SEG, SR, a key image per lesion (at most 5), KOS and result; study.json: the
    route's default outputs."""
    doc = out / "ct_lesion_segmentation" / ct_series / "result.json"
    lesions = len(json.loads(doc.read_text())["segmentation"]["lesions"])
    return 5 + 6 + min(lesions, 5) + 1


def test_an_early_round_alone_writes_its_results_only_after_its_hold_time(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """Early start: processing begins at the association's release, results wait for the
    end of the grace period (here longer than the processing)."""
    from pipeline.core.jobs import read_job

    folders, study_uid, ct_series, _ = _study_with_ct_and_an_unrouted_series(tmp_path)
    settings = make_settings(tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY})
    job = read_job(settings.spool_dir / spool_study(settings, folders, hold_s=6.0))
    assert job.study is not None and job.study.hold_until is not None
    models = Models(discover_contracts(MODEL_REPOSITORY))
    written = run_study(job, settings, models, new_client(triton.grpc, settings.triton))
    out = settings.results_dir / study_uid
    assert len(written) == _files_expected(out, ct_series)  # as without a hold
    assert min(p.stat().st_mtime for p in written) >= job.study.hold_until.timestamp()
    result = settings.results_dir / study_uid / "ct_covid_classifier" / ct_series / "result.json"
    assert json.loads(result.read_text())["prediction"]["label"] == "COVID Positive"


def test_an_early_round_yields_to_instances_that_came_during_its_hold(
    triton: TritonEndpoints,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    new_client: Callable[..., TritonClient],
) -> None:
    """More of the study arrives while an early round is being processed: that round writes
    no result (none partial reaches results or the PACS), and the next round processes its
    series together with the new instances, as if all had come within the grace period."""
    from pipeline.core.jobs import Reason, read_job
    from pipeline.ingest.completion import Completed, close_study

    folders, study_uid, ct_series, mr_series = _study_with_ct_and_an_unrouted_series(tmp_path)
    ct_files = sorted(folders[0].iterdir())
    first = _copy(ct_files[:-1], tmp_path / "first")
    settings = make_settings(tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY})
    models = Models(discover_contracts(MODEL_REPOSITORY))
    client = new_client(triton.grpc, settings.triton)
    round1 = read_job(settings.spool_dir / spool_study(settings, [first, folders[1]], hold_s=2.0))
    store_files(settings, [_copy(ct_files[-1:], tmp_path / "late")])  # within the grace
    with caplog.at_level(logging.INFO, logger="pipeline.stage"):
        assert run_study(round1, settings, models, client) == [
            settings.results_dir / study_uid / "study.json"
        ]
    stages = [(r.stage, getattr(r, "job", "")) for r in caplog.records if hasattr(r, "stage")]
    assert ("superseded", round1.id) in stages  # the stage line says what became of it
    out = settings.results_dir / study_uid
    assert not list(out.rglob("result.json")) and not list(out.rglob("*.dcm"))
    study = json.loads((out / "study.json").read_text())
    assert {s["series_uid"]: s["status"] for s in study["series"]} == {
        ct_series: "superseded",
        mr_series: "superseded",
    }
    assert (settings.archive_dir / round1.id).is_dir()  # its instances, for the next round
    done = Completed(study_uid, Reason.RELEASED, round1.received_at, "CT01", "PIPELINE")
    round2 = close_study(settings.spool_dir, done)
    assert round2 is not None and round2.study is not None and round2.study.instances == 1
    run_study(round2, settings, models, client)
    result = json.loads((out / "ct_covid_classifier" / ct_series / "result.json").read_text())
    assert result["job_id"] == round2.id
    assert result["input"]["shape"][-1] == len(ct_files)  # round 1's slices and the late one
    assert result["prediction"]["label"] == "COVID Positive"
    study = json.loads((out / "study.json").read_text())
    assert study["rounds"] == [round1.id, round2.id]
    assert {s["series_uid"]: s["status"] for s in study["series"]} == {
        ct_series: "done",
        mr_series: "skipped",
    }


def test_two_rounds_of_one_study_processed_at_once_are_both_recorded(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """Two workers take two rounds of the same study at the same moment: they take turns, so
    study.json lists both rounds and every series, whichever finishes last."""
    import threading

    from pipeline.core.jobs import read_job

    folders, study_uid, ct_series, _ = _study_with_ct_and_an_unrouted_series(tmp_path)
    # The second round: one image, for the 2D model (a round no rule takes anything of is
    # recorded as unrouted instead, see test_unrouted.py).
    image = new_series(1, 64, 64, study_uid=study_uid)
    write_series(tmp_path / "image", image)
    folders = [folders[0], tmp_path / "image"]
    settings = make_settings(tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY})
    rounds = [read_job(settings.spool_dir / spool_study(settings, [f])) for f in folders]
    models = Models(discover_contracts(MODEL_REPOSITORY))
    errors: list[Exception] = []

    def work(job: Job) -> None:
        try:
            run_study(job, settings, models, new_client(triton.grpc, settings.triton))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(job,)) for job in rounds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    study = json.loads((settings.results_dir / study_uid / "study.json").read_text())
    assert sorted(study["rounds"]) == sorted(job.id for job in rounds)
    assert {s["series_uid"]: s["status"] for s in study["series"]} == {
        ct_series: "done",
        image.series_uid: "done",
    }


def test_a_task_message_whose_study_uid_is_no_uid_is_refused(tmp_path: Path) -> None:
    """The worker makes paths of the study UID: a forged or corrupted message naming
    ``../..`` is refused before any path is made (the worker logs and drops it)."""
    settings = make_settings(tmp_path / "data")
    spec = new_series(slices=3, rows=16, cols=16)
    write_series(tmp_path / "in", spec, seed=3)
    job_id = spool_study(settings, [tmp_path / "in"])
    message = json.loads((settings.spool_dir / job_id / JOB_FILE).read_text())
    assert Job.model_validate(message).study is not None  # the receiver's own message
    for forged in ("1.2.3/../../../../tmp/x", "../results", "1.2.3\n", ""):
        message["study"]["study_uid"] = forged
        with pytest.raises(ValidationError, match="not a valid DICOM UID"):
            Job.model_validate(message)
