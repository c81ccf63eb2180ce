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

from pipeline.core.jobs import (
    PROCESSING_MARKER,
    Job,
    job_dir,
    mark_enqueued,
    read_job,
    spool_file,
)
from pipeline.core.routing import Priority
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.synthetic import lesion_phantom, write_mednist_png
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.ingest.handover import Producer
from pipeline.ops.status import snapshot
from pipeline.runtime import embedded_redis
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.runtime.process import descendants, free_port
from pipeline.runtime.worker import ready_marker
from pipeline.tasks.app import make_celery
from pipeline.tasks.broker import broker_url
from pipeline.tasks.broker import client as broker_client
from pipeline.tasks.enqueue import job_sender
from pipeline.tasks.leases import Leases

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
        wait_for(lambda: not _spooled(data), 60, "the spool to empty")
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


def _drop_pngs(tmp_path: Path, inbox: Path, n: int, seed: int) -> list[str]:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    names = [f"queued-{k}.png" for k in range(n)]
    for k, name in enumerate(names):
        write_mednist_png(staging / name, "Hand", seed + k)
        os.replace(staging / name, inbox / name)
    return names


def _queued(data: Path) -> int:
    spool = data / "spool"
    return sum(
        (p / ".enqueued").exists() and not (p / ".processing").exists() for p in spool.iterdir()
    )


def _spooled(data: Path) -> list[Path]:
    return [p for p in (data / "spool").iterdir() if not p.name.startswith(".")]


def _wait_all_done(data: Path, study_uid: str, results: int) -> None:
    """Until the study and every file have their results and the spool is empty."""
    folder = data / "results"
    wait_for(
        lambda: (
            (folder / study_uid / "study.json").exists()
            and len(list(folder.rglob("result.json"))) == results
        ),
        240,
        f"{results} results",
    )
    wait_for(lambda: not _spooled(data), 60, "the spool to empty")


def _every_job_once(data: Path, logs: list[Path]) -> None:
    """Every job done exactly once, nothing failed, the spool empty."""
    text = "".join(p.read_text() for p in logs if p.exists())
    done = re.findall(r"stage=done job=(\S+)", text)
    assert len(done) == len(set(done)), done
    assert not list((data / "failed").iterdir())
    assert not _spooled(data)


@pytest.mark.e2e
def test_redis_killed_with_jobs_queued_loses_none_and_runs_none_twice(
    model_repository: Path, tmp_path: Path
) -> None:
    """The embedded Redis SIGKILLed (not stopped) while a study is processed and four files
    wait behind it: `up` restarts it from its append-only file, every job is done once."""
    data, port = tmp_path / "data", free_port()
    env = {**up_env(tmp_path, model_repository, port), "PIPELINE_WORKER__CONCURRENCY": "1"}
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 743, lesions=2)
    study = write_volume_series(tmp_path / "study", hu.astype(np.float32), affine)
    with running_up(tmp_path, env) as up:
        worker_log = data / "run" / "logs" / "worker.log"
        assert _send(tmp_path / "study", port).returncode == 0
        wait_for(lambda: _taken_job(worker_log), 60, "the worker to take the study")
        names = _drop_pngs(tmp_path, data / "inbox", 4, TEST_SEED_BASE + 744)
        wait_for(lambda: _queued(data) == 4, 60, "four files queued behind the study")
        (redis_pid,) = [p for p in descendants(up.pid) if "redis-server" in _cmdline(p)]
        os.kill(redis_pid, signal.SIGKILL)
        _wait_all_done(data, study.study_uid, 2 + len(names))
        logs = [*(data / "run" / "logs").glob("*.log"), tmp_path / "up.log"]
        assert "redis exited" in (tmp_path / "up.log").read_text()  # restarted by `up`
        _every_job_once(data, logs)


@pytest.mark.e2e
def test_up_killed_whole_and_started_again_gives_every_study_its_results_once(
    model_repository: Path, tmp_path: Path
) -> None:
    """A power cut: `up` and every process under it SIGKILLed while a study is processed and
    files wait in the queue; `up` started again on the same data folder finishes them all."""
    data, port = tmp_path / "data", free_port()
    env = {**up_env(tmp_path, model_repository, port), "PIPELINE_WORKER__CONCURRENCY": "1"}
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 745, lesions=2)
    study = write_volume_series(tmp_path / "study", hu.astype(np.float32), affine)
    up = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "up"],
        env=env,
        cwd=tmp_path,
        stdout=(tmp_path / "first-up.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: "ready." in (tmp_path / "first-up.log").read_text(), 300, "`up`")
        worker_log = data / "run" / "logs" / "worker.log"
        assert _send(tmp_path / "study", port).returncode == 0
        wait_for(lambda: _taken_job(worker_log), 60, "the worker to take the study")
        names = _drop_pngs(tmp_path, data / "inbox", 3, TEST_SEED_BASE + 746)
        wait_for(lambda: _queued(data) == 3, 60, "three files queued behind the study")
        everything = [up.pid, *descendants(up.pid)]
        for pid in everything:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        up.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
    first_logs = {p.name: p.read_text() for p in (data / "run" / "logs").glob("*.log")}
    with running_up(tmp_path, env):
        _wait_all_done(data, study.study_uid, 2 + len(names))
    logs = [*(data / "run" / "logs").glob("*.log"), tmp_path / "up.log"]
    text = "".join(first_logs.values()) + "".join(p.read_text() for p in logs)
    done = re.findall(r"stage=done job=(\S+)", text)
    assert len(done) == len(set(done)) == 1 + len(names), done
    assert not list((data / "failed").iterdir())


@pytest.mark.e2e
def test_a_hung_worker_holds_its_study_until_the_time_limit_then_it_is_done_once(
    model_repository: Path, tmp_path: Path
) -> None:
    """The pool process working on a study stopped (SIGSTOP), as a process hung in the kernel
    is: its lease expires and the job is offered again; the other pool process takes it and
    waits on the job's lock, which the hung one holds until Celery's time limit kills it
    (here 45 s); then the study is done, once."""
    data, port = tmp_path / "data", free_port()
    env = {
        **up_env(tmp_path, model_repository, port),
        "PIPELINE_WORKER__TASK_SOFT_TIME_LIMIT_S": "40",
        "PIPELINE_WORKER__TASK_TIME_LIMIT_S": "45",
    }
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 747, lesions=2)
    study = write_volume_series(tmp_path / "study", hu.astype(np.float32), affine)
    with running_up(tmp_path, env):
        worker_log = data / "run" / "logs" / "worker.log"
        assert _send(tmp_path / "study", port).returncode == 0
        wait_for(lambda: _taken_job(worker_log), 60, "the worker to take the study")
        job = _taken_job(worker_log)
        assert job is not None
        # The lease names the process working on the job.
        lease = broker_client(broker_url(Settings(data_dir=data))).get(f"pipeline:lease:{job}")
        assert lease is not None
        hung = int(lease.decode().rsplit(":", 1)[1])
        os.kill(hung, signal.SIGSTOP)
        stopped = time.monotonic()
        result = data / "results" / study.study_uid / "study.json"
        try:
            wait_for(result.exists, 240, "the study's results after its worker hung")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)  # if the time limit has not killed it
        print(f"stop to results: {time.monotonic() - stopped:.1f} s")
        logs = [*(data / "run" / "logs").glob("*.log"), tmp_path / "up.log"]
        assert "stage=redelivered" in "".join(p.read_text() for p in logs)  # the receiver's
        assert _done_lines([worker_log], job) == 1
        assert len(list((data / "results").rglob("result.json"))) == 2
        assert not list((data / "failed").iterdir())


def test_status_shows_a_job_whose_worker_was_lost_until_it_is_taken_again(
    tmp_path: Path,
) -> None:
    """A job a worker took, with no live lease (its worker gone): `status` says so; with the
    lease of a live worker, processing. The receiver's offer then queues it again, once."""
    settings = make_settings(tmp_path / "data")
    settings.ensure_dirs()
    redis = embedded_redis.start(settings)
    try:
        write_mednist_png(settings.inbox_dir / "hand.png", "Hand", TEST_SEED_BASE + 748)
        job = spool_file(settings.inbox_dir / "hand.png", settings.inbox_dir, settings.spool_dir)
        folder = job_dir(settings.spool_dir, job.id)
        mark_enqueued(settings.spool_dir, job.id, Priority.ROUTINE)
        (folder / PROCESSING_MARKER).touch()
        url = broker_url(settings)
        [row] = snapshot(settings, url).in_flight
        assert row.state == "worker lost, to be offered again"
        leases = Leases(broker_client(url))
        assert leases.take(job.id, "node-b:4242") is None
        [row] = snapshot(settings, url).in_flight
        assert row.state == "processing"
        leases.release(job.id, "node-b:4242")
        sent: list[str] = []

        def send(queued: Job) -> Priority:
            sent.append(queued.id)
            return Priority.ROUTINE

        receiver = Producer(settings.spool_dir, send, lost=leases.lost)
        receiver.requeue_pending()
        receiver.requeue_pending()  # the watcher's look a moment later: not offered twice
        assert sent == [job.id]
        [row] = snapshot(settings, url).in_flight
        assert row.state == "queued"
    finally:
        redis.stop()
