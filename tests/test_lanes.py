"""Lanes: a study an urgent route takes is processed before a backlog of routine ones.

The decision is tested on real spooled files; the ordering with the components as several
machines run them: the receiver and the watcher as processes, the embedded Redis, the real
Triton, dcmtk's storescu as the emergency department's CT, and workers that start once the
backlog is queued.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import redis

from pipeline.core.jobs import PROCESSING_MARKER, job_dir, mark_enqueued, read_job, spool_file
from pipeline.core.routing import Match, Priority, Route
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import new_series, write_series
from pipeline.demo.synthetic import write_mednist_png
from pipeline.ops.status import snapshot
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.runtime.process import free_port
from pipeline.tasks import broker
from pipeline.tasks.app import QUEUE, URGENT_QUEUE
from pipeline.tasks.lanes import priority_of

from .conftest import (
    make_settings,
    metric,
    needs_dcmtk,
    running_up,
    spool_study,
    status_json,
    up_env,
    wait_for,
)

STROKE = Route(
    name="stroke",
    match=Match(modality=("CT",), series_description="stroke|perfusion"),
    models=("ct_covid_classifier",),
    priority=Priority.URGENT,
)
ROUTINE_CT = Route(name="ct", match=Match(modality=("CT",)), models=("ct_covid_classifier",))


def test_a_study_is_urgent_when_any_of_its_series_an_urgent_rule_takes(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    routes = (STROKE, ROUTINE_CT)
    plain = new_series(slices=3)
    stroke = dataclasses.replace(
        new_series(slices=3, study_uid=plain.study_uid, series_number=2),
        description="CT HEAD STROKE PROTOCOL",
    )
    write_series(tmp_path / "plain", plain)
    write_series(tmp_path / "stroke", stroke)

    both = spool_study(settings, [tmp_path / "plain", tmp_path / "stroke"])
    job = read_job(job_dir(settings.spool_dir, both))
    assert priority_of(routes, settings.spool_dir, job) is Priority.URGENT

    other = new_series(slices=3)
    write_series(tmp_path / "other", other)
    alone = read_job(job_dir(settings.spool_dir, spool_study(settings, [tmp_path / "other"])))
    assert priority_of(routes, settings.spool_dir, alone) is Priority.ROUTINE
    # Without an urgent rule everything is routine.
    assert priority_of((ROUTINE_CT,), settings.spool_dir, alone) is Priority.ROUTINE


def test_status_shows_the_lane_of_a_job_queued_and_processing(tmp_path: Path) -> None:
    """`status` reads the lane from the spool: an urgent job is `queued (urgent)`, then
    `processing (urgent)` once a worker has it; a routine one plain `queued`, `processing`."""
    settings = make_settings(tmp_path / "data")
    study_of, job_of = {}, {}
    for lane in Priority:
        spec = new_series(slices=1)
        write_series(tmp_path / lane, spec)
        job_of[lane] = spool_study(settings, [tmp_path / lane])
        mark_enqueued(settings.spool_dir, job_of[lane], lane)
        study_of[lane] = spec.study_uid

    def state(lane: Priority) -> str:
        rows = {row.what: row.state for row in snapshot(settings).in_flight}
        return rows[study_of[lane]]

    assert (state(Priority.URGENT), state(Priority.ROUTINE)) == ("queued (urgent)", "queued")
    for job_id in job_of.values():
        (job_dir(settings.spool_dir, job_id) / PROCESSING_MARKER).touch()
    assert (state(Priority.URGENT), state(Priority.ROUTINE)) == (
        "processing (urgent)",
        "processing",
    )


def test_inbox_files_go_through_the_same_rules_and_unreadable_ones_wait_as_routine(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path / "data")
    settings.ensure_dirs()
    big_nifti = Route(
        name="big",
        match=Match(kind=("nifti",), min_slices=40),
        models=("ct_covid_classifier",),
        priority=Priority.URGENT,
    )
    routes = (STROKE, big_nifti)

    def lane(path: Path) -> Priority:
        job = spool_file(path, settings.inbox_dir, settings.spool_dir)
        return priority_of(routes, settings.spool_dir, job)

    for name, slices in (("thick.nii.gz", 48), ("thin.nii.gz", 8)):
        image = nib.Nifti1Image(np.zeros((8, 8, slices), np.float32), np.eye(4))
        nib.save(image, settings.inbox_dir / name)
    assert lane(settings.inbox_dir / "thick.nii.gz") is Priority.URGENT
    assert lane(settings.inbox_dir / "thin.nii.gz") is Priority.ROUTINE

    stroke = dataclasses.replace(new_series(slices=1), description="STROKE")
    (one,) = write_series(tmp_path / "one", stroke)
    # The same file cut short inside its header: what cannot be read does not make it urgent
    # (nor keep it from being queued); the worker will say what is wrong with it.
    (settings.inbox_dir / "cut.dcm").write_bytes(one.read_bytes()[:300])
    os.replace(one, settings.inbox_dir / "stroke.dcm")
    assert lane(settings.inbox_dir / "stroke.dcm") is Priority.URGENT
    assert lane(settings.inbox_dir / "cut.dcm") is Priority.ROUTINE
    (settings.inbox_dir / "broken.nii").write_bytes(b"not a nifti header")
    assert lane(settings.inbox_dir / "broken.nii") is Priority.ROUTINE


# --- Ordering, with real components ------------------------------------------------------

ROUTES_YAML = """
routes:
  - name: emergency          # anything the emergency department's CT sends
    match: {kind: [dicom], calling_aet: [ER_CT], max_slices: 1}
    models: [mednist_classifier]
    priority: urgent
  - name: 2d-image
    match: {kind: [image, dicom], max_slices: 1}
    models: [mednist_classifier]
"""


def _env(
    tmp_path: Path, settings: Settings, triton: TritonEndpoints, models: Path, port: int
) -> dict[str, str]:
    """Every component on ``settings``' data folder and Redis, the test's Triton and rules."""
    (tmp_path / "config.yaml").write_text(ROUTES_YAML)
    return {
        **os.environ,
        "PIPELINE_CONFIG": str(tmp_path / "config.yaml"),
        "PIPELINE_DATA_DIR": str(settings.data_dir),
        "PIPELINE_TRITON__URL": triton.url,
        "PIPELINE_TRITON__MODEL_REPOSITORY": str(models),
        "PIPELINE_INBOX__SETTLE_SECONDS": "0.5",
        "PIPELINE_RECEIVER__HOST": "127.0.0.1",
        "PIPELINE_RECEIVER__PORT": str(port),
        "PIPELINE_RECEIVER__MIN_FREE_DISK_MB": "0",
        "PIPELINE_RECEIVER__RELEASE_GRACE_S": "0.5",
        "PIPELINE_WORKER__PREFAULT_MB": "0",
    }


@contextmanager
def _component(env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def _results(settings: Settings) -> dict[str, dict[str, Any]]:
    """result.json documents by what they came from: a study UID, or an inbox file's name."""
    docs = [json.loads(p.read_text()) for p in settings.results_dir.glob("**/result.json")]
    return {d["input"].get("study_uid") or d["input"]["name"]: d for d in docs}


def _send(port: int, folder: Path, aet: str = "ER_CT") -> None:
    files = [str(p) for p in sorted(folder.iterdir())]
    out = subprocess.run(
        ["storescu", "-aet", aet, "-aec", "PIPELINE", "127.0.0.1", str(port), *files],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr


@needs_dcmtk
def test_an_urgent_study_is_taken_before_a_routine_backlog(
    model_repository: Path,
    triton: TritonEndpoints,
    redis_settings: Settings,
    tmp_path: Path,
) -> None:
    settings = redis_settings
    port = free_port()
    env = _env(tmp_path, settings, triton, model_repository, port)
    logs = tmp_path / "components.log"
    queues = redis.Redis(unix_socket_path=str(broker.socket_path(settings)))

    def depth() -> dict[str, int]:
        return {q: int(queues.llen(q)) for q in (URGENT_QUEUE, QUEUE)}

    urgent_studies = []
    for n in range(3):
        spec = new_series(slices=1)
        write_series(tmp_path / f"er{n}", spec)
        urgent_studies.append(spec.study_uid)

    with _component(env, logs, "scp"), _component(env, logs, "watch"):
        # No worker yet (all busy, or still starting): a backlog of six routine images...
        for n in range(6):
            write_mednist_png(settings.inbox_dir / f"routine-{n}.png", "Hand", n)
        wait_for(lambda: depth()[QUEUE] == 6, 60, "six routine jobs queued")
        # ...then the emergency CT sends a study.
        wait_for(lambda: "DICOM receiver ready" in logs.read_text(), 60, "the receiver")
        _send(port, tmp_path / "er0")
        wait_for(lambda: depth() == {URGENT_QUEUE: 1, QUEUE: 6}, 60, "the urgent job queued")
        snap = status_json(env, tmp_path)
        assert snap["queues"][URGENT_QUEUE] == 1 and snap["queues"][QUEUE] == 6
        states = {row["what"]: row["state"] for row in snap["in_flight"]}
        assert states[urgent_studies[0]] == "queued (urgent)"
        assert list(states.values()).count("queued") == 6

        # A worker kept for urgent studies takes the urgent one and leaves the rest.
        with _component(env, logs, "worker", "--concurrency", "1", "--lane", "urgent"):
            wait_for(lambda: urgent_studies[0] in _results(settings), 180, "the urgent result")
            wait_for(lambda: depth()[URGENT_QUEUE] == 0, 10, "the urgent queue empty")
        assert depth()[QUEUE] == 6
        assert list(_results(settings)) == [urgent_studies[0]]

        # Two more urgent studies arrive behind the backlog; a worker for both lanes takes
        # both first (asked in rotation, as kombu does by default, the queues would take turns:
        # the second urgent study would wait for a routine one).
        _send(port, tmp_path / "er1")
        _send(port, tmp_path / "er2")
        wait_for(lambda: depth()[URGENT_QUEUE] == 2, 60, "two more urgent jobs queued")
        with _component(env, logs, "worker", "--concurrency", "1"):
            wait_for(lambda: len(_results(settings)) == 9, 240, "every result")

    results = _results(settings)
    finished = {k: datetime.fromisoformat(d["timings"]["finished"]) for k, d in results.items()}
    routine = [finished[f"routine-{n}.png"] for n in range(6)]
    assert max(finished[u] for u in urgent_studies[1:]) < min(routine), finished
    assert all(results[u]["input"]["route"] == "emergency" for u in urgent_studies)
    assert {results[f"routine-{n}.png"]["input"]["route"] for n in range(6)} == {"2d-image"}
    # The lane each waited in is on record, for the department's turnaround audit.
    assert {results[u]["priority"] for u in urgent_studies} == {"urgent"}
    assert {results[f"routine-{n}.png"]["priority"] for n in range(6)} == {"routine"}
    for uid in urgent_studies:
        study = json.loads((settings.results_dir / uid / "study.json").read_text())
        assert study["priority"] == "urgent" and study["schema_version"] == "1.4"
        # The worker knows the lane from the queue; job.json keeps the previous version's keys,
        # so a component not yet upgraded still reads it.
        job = json.loads((settings.archive_dir / study["job_id"] / "job.json").read_text())
        assert "priority" not in job
    shown = {row["what"]: row["urgent"] for row in status_json(env, tmp_path)["results"]}
    assert shown == {
        **dict.fromkeys(urgent_studies, True),
        **{f"routine-{n}.png": False for n in range(6)},
    }


def _parent(pid: int) -> int:
    """A live process's parent's id (/proc/<pid>/stat: the field after the state)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@needs_dcmtk
def test_up_keeps_pool_processes_for_urgent_studies(
    model_repository: Path, triton: TritonEndpoints, tmp_path: Path
) -> None:
    """With worker.urgent_concurrency, `up` runs a second worker for the urgent lane alone: an
    urgent study sent while the routine worker is busy with a backlog of CT studies is
    processed in its pool at the same time as a routine study; the routine worker takes none
    of it.
    Its log and metrics are its own."""
    (tmp_path / "config.yaml").write_text(
        ROUTES_YAML
        + """  - name: ct-volume
    match: {kind: [dicom], modality: [CT], min_slices: 16}
    models: [ct_lesion_segmentation]
"""
    )
    port, metrics_port, urgent_metrics_port = free_port(), free_port(), free_port()
    env = up_env(tmp_path, model_repository, port) | {
        "PIPELINE_TRITON__URL": triton.url,  # the test's: `up` starts none
        "PIPELINE_WORKER__CONCURRENCY": "1",
        "PIPELINE_WORKER__URGENT_CONCURRENCY": "1",
        "PIPELINE_WORKER__PREFAULT_MB": "0",
        "PIPELINE_RECEIVER__RELEASE_GRACE_S": "0.5",
        "PIPELINE_RECEIVER__MIN_FREE_DISK_MB": "0",
        "PIPELINE_METRICS__WORKER_PORT": str(metrics_port),
        "PIPELINE_METRICS__URGENT_WORKER_PORT": str(urgent_metrics_port),
    }
    backlog = []
    for n in range(5):
        spec = new_series(slices=96, rows=256, cols=256)
        write_series(tmp_path / f"ct{n}", spec, seed=n)
        backlog.append(spec.study_uid)
    er = new_series(slices=1)
    write_series(tmp_path / "er", er)
    data = tmp_path / "data"
    run = data / "run"
    settings = make_settings(data)

    with running_up(tmp_path, env):
        urgent_worker = int((run / "worker-urgent.ready").read_text())
        worker = int((run / "worker.ready").read_text())
        for n in range(5):
            _send(port, tmp_path / f"ct{n}", aet="CT01")
        # As `status` tells it, read straight from the spool: the urgent study goes as soon as
        # the routine worker has begun a study of the backlog, not while it ends one (the
        # urgent study, 50 ms of work, would then fit between two routine studies, as it would
        # without the urgent worker).
        begun = set(settings.spool_dir.glob(f"*/{PROCESSING_MARKER}"))
        wait_for(
            lambda: bool(set(settings.spool_dir.glob(f"*/{PROCESSING_MARKER}")) - begun),
            120,
            "the routine worker beginning a study",
        )
        _send(port, tmp_path / "er")
        wait_for(lambda: len(_results(settings)) == 6, 300, "every result")
        pools = {
            uid: _parent(doc["worker"]["pid"]) for uid, doc in _results(settings).items()
        }  # their pool processes live on while `up` runs
        # Each worker's endpoint: what it did, and the lanes' turnaround for alerting.
        counts = {
            (endpoint, lane): metric(
                f"http://127.0.0.1:{endpoint}/metrics",
                "dicom_pipeline_turnaround_seconds_count",
                priority=lane,
            )
            for endpoint in (metrics_port, urgent_metrics_port)
            for lane in Priority
        }
        completed = metric(
            f"http://127.0.0.1:{urgent_metrics_port}/metrics",
            "dicom_pipeline_jobs_completed_total",
        )

    assert pools[er.study_uid] == urgent_worker
    assert {pools[uid] for uid in backlog} == {worker}
    done = _results(settings)
    at = {
        k: {t: datetime.fromisoformat(d["timings"][t]) for t in ("started", "finished")}
        for k, d in done.items()
    }
    urgent = at[er.study_uid]
    # Processed while a routine study was (one routine pool process: never two at once); not
    # after it, as it would be without the urgent worker.
    assert any(
        urgent["started"] < at[uid]["finished"] and at[uid]["started"] < urgent["finished"]
        for uid in backlog
    ), at
    assert done[er.study_uid]["priority"] == "urgent"
    assert completed == 1
    assert counts == {
        (metrics_port, Priority.ROUTINE): 5,
        (metrics_port, Priority.URGENT): 0,
        (urgent_metrics_port, Priority.ROUTINE): 0,
        (urgent_metrics_port, Priority.URGENT): 1,
    }
    assert (run / "logs" / "urgent-worker.log").stat().st_size > 0
