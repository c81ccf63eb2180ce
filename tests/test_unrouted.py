"""What a PACS forwards that no model handles: real vendors' objects (pydicom's test files: an
ultrasound cine, a text report, an RT plan, a segmentation, an ECG) no rule takes are set aside
as the ``unrouted`` setting says, recorded by modality and SOP class, never failed by default;
the receiver can be told to keep only some modalities or SOP classes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from pipeline.core import unrouted
from pipeline.core.contract import discover_contracts
from pipeline.core.jobs import Job, read_job
from pipeline.core.routing import DEFAULT_ROUTES
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import new_series, write_series
from pipeline.demo.synthetic import write_mednist_png
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.triton_client import TritonClient
from pipeline.ops import unrouted as unrouted_ops
from pipeline.ops.status import snapshot
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.runtime.process import free_port
from pipeline.studies.file_job import run_job
from pipeline.studies.models import Models
from pipeline.studies.steps import StageError
from pipeline.studies.study_job import run_study

from .conftest import MODEL_REPOSITORY, make_settings, spool_study
from .test_receiver import Running, receiver  # noqa: F401 - receiver: the fixture
from .test_stow import STORED, _part10, _post, _uids

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# Real objects no default rule takes: (file, modality, SOP class).
NO_MODEL_FOR = {
    "examples_ybr_color.dcm": ("US", "1.2.840.10008.5.1.4.1.1.3.1"),  # a 30-frame cine
    "reportsi.dcm": ("SR", "1.2.840.10008.5.1.4.1.1.88.11"),
    "rtplan.dcm": ("RTPLAN", "1.2.840.10008.5.1.4.1.1.481.5"),
    "liver_1frame.dcm": ("SEG", "1.2.840.10008.5.1.4.1.1.66.4"),
    "waveform_ecg.dcm": ("ECG", "1.2.840.10008.5.1.4.1.1.9.1.1"),
}


def unrouted_today(folder: Path) -> list[unrouted.Entry]:
    return unrouted.entries(folder, datetime.now(UTC).date())


def _copy(name: str, folder: Path, study_uid: str | None = None) -> Path:
    """A pydicom test file under fresh UIDs (several share theirs), as a PACS would send it."""
    ds = dcmread(PYDICOM_FILES / name)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path)
    return path


def _run(settings: Settings, folder: Path, client: TritonClient) -> tuple[Job, list[Path]]:
    job = read_job(settings.spool_dir / spool_study(settings, [folder]))
    return job, run_study(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)


def test_studies_no_rule_takes_are_recorded_and_archived_not_failed(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    settings = make_settings(tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY})
    client = new_client(triton.grpc, settings.triton)
    jobs = {}
    for name in NO_MODEL_FOR:
        job, written = _run(settings, _copy(name, tmp_path / name).parent, client)
        assert written == []
        jobs[job.id] = name
    # Nothing failed, nothing in results: each is one line of today's record, its input
    # archived as a processed one's.
    assert not any(settings.failed_dir.iterdir())
    assert not any(settings.results_dir.iterdir())
    assert {p.name for p in settings.archive_dir.iterdir()} == set(jobs)
    entries = unrouted_today(settings.unrouted_dir)
    assert {e.job: e.policy for e in entries} == dict.fromkeys(jobs, "ignore")
    for entry in entries:
        modality, sop_class = NO_MODEL_FOR[jobs[entry.job]]
        [item] = entry.items
        assert (item.modality, item.sop_class) == (modality, sop_class), entry
        assert item.reason, entry
    cine = next(e for e in entries if jobs[e.job] == "examples_ybr_color.dcm")
    assert "30 frames in one object > 1" in cine.items[0].reason  # why, rule by rule
    status = snapshot(settings).unrouted
    assert status.jobs == 5 and status.by_modality == dict.fromkeys(
        ("US", "SR", "RTPLAN", "SEG", "ECG"), 1
    )
    assert status.line.startswith("unrouted today: 5; by modality ")


def test_kept_inputs_are_routed_again_once_a_rule_takes_them(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    only_ct = DEFAULT_ROUTES[:1]
    settings = make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        routes=only_ct,
        unrouted="keep",
    )
    client = new_client(triton.grpc, settings.triton)
    spec = new_series(1, 64, 64)
    job, written = _run(settings, write_series(tmp_path / "one", spec)[0].parent, client)
    assert written == [] and not any(settings.failed_dir.iterdir())
    kept = settings.unrouted_dir / job.id
    assert unrouted.read_entry(kept).policy == "keep"
    assert len(list((kept / "study").rglob("*.dcm"))) == 1  # the input, whole
    # A rule for single images is added: the kept study is queued again and processed.
    settings = settings.model_copy(update={"routes": DEFAULT_ROUTES})
    queued: list[Job] = []

    def enqueue(job: Job) -> bool:
        queued.append(job)
        return True

    [(what, ok)] = unrouted_ops.retry_all(settings, enqueue)
    assert ok and "queued again" in what and [j.id for j in queued] == [job.id]
    models = Models(discover_contracts(MODEL_REPOSITORY))
    written = run_study(queued[0], settings, models, client)
    results = [p for p in written if p.name == "result.json"]
    assert [p.parent.parent.name for p in results] == ["mednist_classifier"]
    assert not kept.exists()


def test_fail_policy_fails_what_no_rule_takes(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    settings = make_settings(
        tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY}, unrouted="fail"
    )
    client = new_client(triton.grpc, settings.triton)
    with pytest.raises(StageError, match=r"nothing to process: .*no rule matched") as err:
        _run(settings, _copy("examples_ybr_color.dcm", tmp_path / "us").parent, client)
    assert err.value.stage == "route" and type(err.value.error).__name__ == "NoModelError"


def test_an_inbox_file_no_rule_takes_is_recorded_by_name(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    from pipeline.core.jobs import spool_file

    settings = make_settings(
        tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY}, routes=DEFAULT_ROUTES[:2]
    )
    settings.ensure_dirs()
    write_mednist_png(settings.inbox_dir / "hand.png", "Hand", TEST_SEED_BASE + 970)
    job = spool_file(settings.inbox_dir / "hand.png", settings.inbox_dir, settings.spool_dir)
    models = Models(discover_contracts(MODEL_REPOSITORY))
    assert run_job(job, settings, models, new_client(triton.grpc, settings.triton)) == []
    [entry] = unrouted_today(settings.unrouted_dir)
    assert entry.name == "hand.png" and entry.items[0].kind == "image"
    assert not any(settings.failed_dir.iterdir())


def test_the_receiver_keeps_only_the_modalities_and_classes_it_is_told(
    receiver: Callable[..., Running],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Others are answered success (a PACS would resend a refusal for ever) and never spooled:
    by C-STORE and by STOW-RS alike."""
    from pipeline.outputs.send.scu import send

    rx = receiver(accept_modalities=("CT", "MR"), dicomweb_port=free_port())
    study = generate_uid()
    wanted = [_copy(n, tmp_path / "in", study) for n in ("CT_small.dcm", "MR_small.dcm")]
    others = [_copy(n, tmp_path / "in", study) for n in NO_MODEL_FOR]
    report = send([*wanted, *others], rx.peer())
    assert report.ok, report.failed
    [task] = rx.wait_tasks(1)
    assert {p.stem for p in rx.job_files(task)} == {str(dcmread(p).SOPInstanceUID) for p in wanted}
    # STOW-RS: every part answered stored; only the MR kept.
    second = generate_uid()
    parts = [dcmread(_copy(n, tmp_path / "web", second)) for n in ("MR_small.dcm", "rtplan.dcm")]
    status, doc = _post(rx, [_part10(ds) for ds in parts])
    assert status == 200 and len(_uids(doc, STORED)) == 2
    [_, task] = rx.wait_tasks(2)
    assert [p.stem for p in rx.job_files(task)] == [str(parts[0].SOPInstanceUID)]


def test_unrouted_list_names_the_days_inputs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    entry = unrouted.Entry(
        time=datetime.now(UTC),
        job="20261206T120000Z-0000abcd",
        source="dicom",
        study="1.2.3.4",
        policy="ignore",
        items=[unrouted.Item(what="1.2.3.4.5", kind="dicom", modality="MR", reason="no rule")],
    )
    unrouted.record(data / "unrouted", entry)
    (tmp_path / "cfg.yaml").write_text(f"data_dir: {data}\n")
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "unrouted", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PIPELINE_CONFIG": str(tmp_path / "cfg.yaml")},
    )
    assert out.returncode == 0, out.stderr
    assert "20261206T120000Z-0000abcd  1.2.3.4  ignore  MR" in out.stdout
    assert "1 input(s) no rule took" in out.stdout
