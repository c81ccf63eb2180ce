"""A worker lost whole (its main process SIGKILLed: the OOM killer, an evicted pod, a node gone)
costs its study seconds, not the broker's hour: the job's lease (pipeline.tasks.leases) expires,
the receiver offers the job again under the same id, and another worker (or the one `up`
restarts) does it, once: one set of results, one `done` line, nothing failed. Against the real
processes: `up`, and two workers sharing one spool and one broker."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.jobs import job_dir, read_job
from pipeline.core.routing import Priority
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.synthetic import lesion_phantom
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.runtime import embedded_redis
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.runtime.process import descendants, free_port
from pipeline.runtime.worker import ready_marker
from pipeline.tasks.app import make_celery
from pipeline.tasks.broker import broker_url
from pipeline.tasks.enqueue import job_sender

from .conftest import make_settings, running_up, up_env, wait_for
from .test_faults import _cmdline, _ppid, _send


def _done_lines(logs: list[Path], job: str) -> int:
    return sum(p.read_text().count(f"stage=done job={job}") for p in logs if p.exists())


def _taken_job(log: Path) -> str | None:
    found = re.search(r"stage=started job=(\S+)", log.read_text()) if log.exists() else None
    return found[1] if found else None


@pytest.mark.e2e
def test_a_worker_killed_whole_mid_study_under_up_is_redone_once(
    model_repository: Path, tmp_path: Path
) -> None:
    data, port = tmp_path / "data", free_port()
    env = up_env(tmp_path, model_repository, port)
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 740, lesions=2)
    study = write_volume_series(tmp_path / "study", hu.astype(np.float32), affine)
    with running_up(tmp_path, env) as up:
        worker_log = data / "run" / "logs" / "worker.log"
        assert _send(tmp_path / "study", port).returncode == 0
        wait_for(lambda: _taken_job(worker_log), 60, "the worker to take the study")
        job = _taken_job(worker_log)
        assert job is not None
        (worker,) = [
            p
            for p in descendants(up.pid)
            if "pipeline worker" in _cmdline(p) and _ppid(p) == up.pid
        ]
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        result = data / "results" / study.study_uid / "study.json"
        wait_for(result.exists, 120, "the study's results after the worker was killed")
        took = time.monotonic() - killed
        wait_for(
            lambda: not [p for p in (data / "spool").iterdir() if not p.name.startswith(".")],
            60,
            "the spool to empty",
        )
        logs = [*(data / "run" / "logs").glob("*.log"), tmp_path / "up.log"]
        text = "".join(p.read_text() for p in logs)
        print(f"kill to results: {took:.1f} s")
        assert _done_lines(logs, job) == 1, text[-4000:]
        results = list((data / "results").rglob("result.json"))
        assert len(results) == 2  # the covid classifier and the lesion model, once each
        assert json.loads(result.read_text())["rounds"] == [job]
        assert not list((data / "failed").iterdir())


def _ready(marker: Path, pid: str) -> bool:
    return marker.exists() and marker.read_text() == pid


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.mark.e2e
def test_two_workers_share_a_spool_and_one_killed_leaves_the_study_to_the_other(
    triton: TritonEndpoints, tmp_path: Path
) -> None:
    """Two machines' workers, as a Compose or Kubernetes site runs them: one spool, one broker,
    one receiver. The worker that took the study is SIGKILLed; the other finishes it, once."""
    data, port = tmp_path / "data", free_port()
    settings = make_settings(data)
    settings.ensure_dirs()
    redis = embedded_redis.start(settings)
    (tmp_path / "none.yaml").write_text("{}\n")
    env = dict(
        os.environ,
        PIPELINE_DATA_DIR=str(data),
        PIPELINE_CONFIG=str(tmp_path / "none.yaml"),
        PIPELINE_BROKER_URL=broker_url(settings),
        PIPELINE_TRITON__URL=triton.grpc,
        PIPELINE_RECEIVER__HOST="127.0.0.1",
        PIPELINE_RECEIVER__PORT=str(port),
        PIPELINE_METRICS__RECEIVER_PORT=str(free_port()),
        PIPELINE_WORKER__CONCURRENCY="1",
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ready = data / "run" / ready_marker(tuple(Priority))
    try:
        procs["scp"] = _start(["scp"], env, tmp_path / "scp.log")
        for name in ("w1", "w2"):  # one after the other: they share the ready marker
            own = {**env, "PIPELINE_METRICS__WORKER_PORT": str(free_port())}
            procs[name] = _start(["worker"], own, tmp_path / f"{name}.log")
            wait_for(lambda pid=str(procs[name].pid): _ready(ready, pid), 180, f"{name} ready")
        hu, _, affine = lesion_phantom(TEST_SEED_BASE + 741, lesions=2)
        study = write_volume_series(tmp_path / "study", hu.astype(np.float32), affine)
        assert _send(tmp_path / "study", port).returncode == 0
        logs = {n: tmp_path / f"{n}.log" for n in ("w1", "w2")}
        wait_for(lambda: any(_taken_job(p) for p in logs.values()), 60, "a worker to take it")
        taker = next(n for n, p in logs.items() if _taken_job(p))
        other = "w2" if taker == "w1" else "w1"
        job = _taken_job(logs[taker])
        assert job is not None
        os.kill(procs[taker].pid, signal.SIGKILL)
        killed = time.monotonic()
        result = data / "results" / study.study_uid / "study.json"
        wait_for(result.exists, 120, "the study's results after its worker was killed")
        print(f"kill to results: {time.monotonic() - killed:.1f} s")
        assert _done_lines([logs[other]], job) == 1 and _done_lines([logs[taker]], job) == 0
        assert "stage=redelivered" in (tmp_path / "scp.log").read_text()
        assert len(list((data / "results").rglob("result.json"))) == 2
        assert not list((data / "failed").iterdir())
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        redis.stop()


@pytest.mark.e2e
def test_a_job_handed_out_again_while_it_runs_is_not_run_twice(
    model_repository: Path, tmp_path: Path
) -> None:
    """What Redis does to a task still running after its visibility timeout: the same job's
    message handed out again, here while the worker's first pool process segments the study.
    The second pool process finds the job's lease live and drops the delivery: one run."""
    data, port = tmp_path / "data", free_port()
    env = up_env(tmp_path, model_repository, port)
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 742, lesions=2)
    study = write_volume_series(tmp_path / "study", hu.astype(np.float32), affine)
    with running_up(tmp_path, env):
        worker_log = data / "run" / "logs" / "worker.log"
        assert _send(tmp_path / "study", port).returncode == 0
        wait_for(lambda: _taken_job(worker_log), 60, "the worker to take the study")
        job_id = _taken_job(worker_log)
        assert job_id is not None
        settings = Settings(data_dir=data)
        job = read_job(job_dir(settings.spool_dir, job_id))
        celery = make_celery(settings, broker_url(settings))
        job_sender(celery, settings)(job)  # the same message, handed out again
        result = data / "results" / study.study_uid / "study.json"
        wait_for(result.exists, 120, "the study's results")
        wait_for(
            lambda: f"job {job_id} is being processed by" in worker_log.read_text(),
            30,
            "the second delivery to be dropped",
        )
        assert worker_log.read_text().count(f"stage=started job={job_id}") == 1
        assert _done_lines([worker_log], job_id) == 1
        assert json.loads(result.read_text())["rounds"] == [job_id]
        assert len(list((data / "results").rglob("result.json"))) == 2
