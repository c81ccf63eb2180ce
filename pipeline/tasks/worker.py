"""The Celery task: a thin wrapper that turns processing outcomes into retry or quarantine.

Transient errors (Triton or the results disk unavailable) are retried with exponential
backoff and jitter; once retries are exhausted, and for every permanent error, the job's
folder moves to ``data/failed/<id>/`` with ``error.json``. The input is never deleted.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
from celery import Celery, Task
from celery.signals import worker_process_init, worker_process_shutdown
from celery.utils.time import get_exponential_backoff_interval

from pipeline.convert.series import numpy_huge_pages
from pipeline.core import observe
from pipeline.core.contract import discover_contracts
from pipeline.core.errors import TransientError
from pipeline.core.jobs import PROCESSING_MARKER, Job, error_record, job_dir, now, quarantine
from pipeline.core.routing import Route
from pipeline.core.settings import Settings
from pipeline.inference.triton_client import TritonClient
from pipeline.outputs.send import dispatch
from pipeline.studies.file_job import run_job
from pipeline.studies.models import Models
from pipeline.studies.steps import Dispatch, StageError
from pipeline.studies.study_job import run_study
from pipeline.tasks.app import DISPATCH_TASK, TASK_NAME, lane_of
from pipeline.tasks.broker import client as broker_client
from pipeline.tasks.enqueue import offer
from pipeline.tasks.leases import Leases, holding, job_lock
from pipeline.tasks.memory import keep_freed_memory, prefault
from pipeline.tasks.warmup import warm_up

log = logging.getLogger(__name__)

LEASE_CALL_TIMEOUT_S = 2.0  # a Redis that hangs must not hold a job up for long


class WorkerContext:
    """Per worker process: the contracts, a Triton connection and the job leases (in the
    broker's Redis), made on first use."""

    def __init__(self, settings: Settings, triton_url: str, broker: str | None = None) -> None:
        self.settings = settings
        self.triton_url = triton_url
        self.broker = broker
        self._models: Models | None = None
        self._client: TritonClient | None = None
        self._leases: Leases | None = None
        self.in_pool = False  # a Celery pool process: its torch threads are its own to set
        self.started_marker: Path | None = None  # a pool process's, for wait_for_pool

    @property
    def models(self) -> Models:
        if self._models is None:
            self._models = Models(discover_contracts(self.settings.triton.model_repository))
        return self._models

    @property
    def client(self) -> TritonClient:
        if self._client is None:
            self._client = TritonClient(self.triton_url, self.settings.triton)
            if self.in_pool:
                self._use_spare_cores(self._client)
        return self._client

    @property
    def leases(self) -> Leases | None:
        """None where the broker is not Redis (no lease: the job lock still holds)."""
        if self._leases is None and self.broker is not None and self.broker.startswith("redis"):
            self._leases = Leases(broker_client(self.broker, timeout=LEASE_CALL_TIMEOUT_S))
        return self._leases

    def _use_spare_cores(self, client: TritonClient) -> None:
        """Cores the pool processes leave over go to their torch threads, unless Triton
        computes on them. Asked here, after the fork, on this process's own connection: gRPC
        objects made before a fork are not safe to use in its children."""
        threads = self.settings.worker.threads_per_process(client.computes_on_this_cpu())
        torch.set_num_threads(threads)
        log.info("pool process %d computes with %d torch thread(s)", os.getpid(), threads)

    def reset(self) -> None:
        """After fork: connections made by the parent must not be shared."""
        self._client = None
        self._leases = None

    def close(self) -> None:
        """At the process's end: the client's shared memory regions are given back."""
        if self._client is not None:
            self._client.close()
            self._client = None


def register_tasks(app: Celery, settings: Settings, triton_url: str) -> WorkerContext:
    """Register the tasks on ``app``; the context they share is returned, for a caller that
    runs them in its own process (tests) to close."""
    ctx = WorkerContext(settings, triton_url, app.conf.broker_url)
    shutil.rmtree(_pool_dir(settings, os.getpid()), ignore_errors=True)  # a reused pid's

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _init_process(**_: Any) -> None:
        # One torch thread until Triton has been asked whether the other cores are free
        # (WorkerContext.client).
        torch.set_num_threads(1)
        ctx.in_pool = True
        numpy_huge_pages(settings.worker.numpy_huge_pages)
        if settings.worker.keep_freed_memory and keep_freed_memory():
            _prefault(settings.worker.prefault_mb)
        ctx.reset()
        ctx.started_marker = _pool_marker(settings)
        ctx.started_marker.touch()

    @worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _end_process(**_: Any) -> None:
        ctx.close()
        if ctx.started_marker is not None:  # its path names the worker, maybe gone by now
            ctx.started_marker.unlink(missing_ok=True)

    # shared=False: a shared task would be added to every Celery app made later in this
    # process, bound to this context; a second app (tests, `bench`) would then run the first
    # app's settings under the same name.
    @app.task(name=TASK_NAME, bind=True, max_retries=None, shared=False)  # type: ignore[untyped-decorator]
    def process_job(self: Task, message: dict[str, Any]) -> None:
        handle(self, ctx, message)

    @app.task(name=DISPATCH_TASK, bind=True, max_retries=None, shared=False)  # type: ignore[untyped-decorator]
    def send_results(self: Task, message: dict[str, Any]) -> None:
        handle_delivery(self, ctx.settings, message)

    return ctx


def _pool_dir(settings: Settings, worker_pid: int) -> Path:
    # By host too: the data folder may be shared by the workers of several machines.
    return settings.run_dir / "pool-ready" / f"{socket.gethostname()}-{worker_pid}"


def _pool_marker(settings: Settings) -> Path:
    """This pool process's "started" marker, under its worker's folder."""
    folder = _pool_dir(settings, os.getppid())
    folder.mkdir(parents=True, exist_ok=True)
    return folder / str(os.getpid())


def wait_for_pool(settings: Settings) -> bool:
    """In the worker's main process: until each of its pool processes has started (and
    prefaulted its memory); False if they have not within Celery's own limit (a few seconds
    more for their fork). Celery says it is ready before its pool processes are: a study
    sent then would wait for them."""
    folder = _pool_dir(settings, os.getpid())
    deadline = time.monotonic() + settings.worker.process_start_limit_s + 6.0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if len(list(folder.iterdir())) >= settings.worker.concurrency:
                return True
        time.sleep(0.1)
    return False


def _prefault(mb: int) -> None:
    if not mb:
        return
    seconds = prefault(mb)
    if seconds is None:
        log.warning("pool process %d: %d MB of memory not available to prefault", os.getpid(), mb)
    else:
        log.info("pool process %d: %d MB of memory made ready in %.2f s", os.getpid(), mb, seconds)


def warm_up_before_fork(ctx: WorkerContext) -> None:
    """The worker's main process pays the first-use costs (:mod:`pipeline.tasks.warmup`) before
    Celery forks its pool: every pool process, and any that replaces one later, starts warm,
    and the worker reports ready only after this. On one torch thread, as in the pool
    processes: a thread pool of torch's started here would not survive the fork. Then what
    was loaded is frozen out of the garbage collector's generations (gc.freeze)."""
    torch.set_num_threads(1)
    try:
        seconds = warm_up(ctx.models.contracts.values(), ctx.settings.output.iod_check)
        log.info("worker warmed up in %.2f s", seconds)
    except Exception as exc:  # noqa: BLE001 - best effort: the first study pays instead
        log.warning("worker warm-up failed, the first study pays instead: %s", exc)
    # The half million objects loaded by now (torch, MONAI, highdicom's tables) live as long
    # as the process: out of the collector's reach, a full collection in a pool process takes
    # 8 ms instead of 200 ms, which had come every second study. The pool inherits this.
    gc.collect()
    gc.freeze()
    log.info("%d objects frozen for the pool processes' garbage collector", gc.get_freeze_count())


def handle(task: Task, ctx: WorkerContext, message: dict[str, Any]) -> None:
    settings = ctx.settings
    try:
        job = Job.model_validate(message)
    except ValueError as exc:
        # A malformed message names no spool folder we could trust; log it, keep nothing.
        log.error("rejected malformed task message: %s", exc)
        return
    job = job.model_copy(update={"priority": lane_of(task.request.delivery_info)})

    def send(route: Route, files: list[Path]) -> None:
        offer(task.app, settings, job.id, route, files)

    folder = job_dir(settings.spool_dir, job.id)
    with holding(ctx.leases, job.id) as other:
        if other is not None:  # Redis handed out a slow job's message again, say
            log.info("job %s is being processed by %s: this delivery is dropped", job.id, other)
            return
        with job_lock(folder) as ours:
            if ours:
                _process(task, ctx, job, send)
            else:
                log.info("job %s: already processed, nothing to do", job.id)


def _process(task: Task, ctx: WorkerContext, job: Job, send: Dispatch) -> None:
    """One job, under its lease and lock: done, retried later, or failed."""
    settings = ctx.settings
    study = job.study.study_uid if job.study else ""
    marker = job_dir(settings.spool_dir, job.id) / PROCESSING_MARKER
    with contextlib.suppress(OSError):  # taken: status pages, and the search for lost jobs
        marker.touch()
    if job.queued_at is not None:
        waited = (now() - job.queued_at).total_seconds()
        observe.stage("started", job=job.id, study=study, seconds=waited, source=job.source)
    try:
        run = run_study if job.source == "dicom" else run_job
        if not run(job, settings, ctx.models, ctx.client, send):
            return  # an earlier delivery finished it (acks are late): not done a second time
        # From the first byte received (or the file dropped) to every result written.
        total = (now() - job.received_at).total_seconds()
        lane = job.priority or "unknown"  # None only for a queue that is not one of ours
        observe.stage("done", job=job.id, study=study, seconds=total, priority=lane)
        observe.turnaround(lane, total)
        observe.count("completed")
    except StageError as exc:
        retries = int(task.request.retries or 0)
        if isinstance(exc.error, TransientError) and retries < settings.worker.max_retries:
            countdown = _backoff(retries, settings.worker.retry_backoff_max_s)
            log.warning("job %s: %s; retry %d in %d s", job.id, exc, retries + 1, countdown)
            marker.unlink(missing_ok=True)  # queued again, not lost: no one offers it anew
            raise task.retry(countdown=countdown, exc=exc) from exc
        fail_job(job, settings, exc.error, exc.stage)
    except Exception as exc:
        log.exception("job %s: unexpected error", job.id)
        fail_job(job, settings, exc, "unexpected")


def handle_delivery(task: Task, settings: Settings, message: dict[str, Any]) -> None:
    """Send a route's DICOM results to one destination; retry what may pass later."""
    try:
        delivery = dispatch.Delivery.model_validate(message)
    except ValueError as exc:
        log.error("rejected malformed send message: %s", exc)
        return
    outcome = dispatch.deliver(settings, delivery)
    name = delivery.destination
    if outcome.sent:
        log.info("job %s: %d file(s) sent to %s", delivery.job_id, len(outcome.sent), name)
        observe.stage("sent", job=delivery.job_id, destination=name, files=len(outcome.sent))
    if outcome.refused:
        where = dispatch.record_failure(settings, delivery, outcome.refused)
        _failed(delivery.job_id, "", "send", destination=name)
        log.error(
            "job %s: %s refused %d file(s); see %s",
            delivery.job_id,
            name,
            len(outcome.refused),
            where,
        )
    if not outcome.pending:
        return
    retries = int(task.request.retries or 0)
    destination = settings.destinations.get(name)
    if destination is not None and retries < destination.max_retries:
        countdown = _backoff(retries, destination.retry_backoff_max_s)
        log.warning(
            "job %s: %s unavailable, %d file(s) to send; retry %d in %d s",
            delivery.job_id,
            name,
            len(outcome.pending),
            retries + 1,
            countdown,
        )
        rest = delivery.model_copy(update={"files": outcome.pending})
        raise task.retry(args=[rest.model_dump(mode="json")], countdown=countdown)
    reasons = dict.fromkeys(
        outcome.pending, f"{name} still unavailable after {retries + 1} attempts"
    )
    where = dispatch.record_failure(settings, delivery, reasons)
    _failed(delivery.job_id, "", "send", destination=name)
    log.error("job %s: gave up sending to %s; see %s", delivery.job_id, name, where)


def _failed(job_id: str, study: str, at: str, **fields: Any) -> None:
    """The stage line and the failure count of a job (or a delivery) that went to failed/."""
    observe.stage("failed", job=job_id, study=study, at=at, **fields)
    observe.count("failed", at)


def _backoff(retries: int, maximum: int) -> int:
    return int(
        get_exponential_backoff_interval(
            factor=2, retries=retries, maximum=maximum, full_jitter=True
        )
    )


def fail_job(job: Job, settings: Settings, exc: BaseException, stage: str) -> None:
    """The job's folder, input kept, to data/failed/<id>/ with error.json."""
    folder = job_dir(settings.spool_dir, job.id)
    if not folder.exists():
        log.error("job %s failed at %s but its spool folder is gone: %s", job.id, stage, exc)
        return
    dest = quarantine(folder, settings.failed_dir, error_record(exc, stage, job))
    _failed(job.id, job.study.study_uid if job.study else "", stage)
    log.error(
        "job %s failed at %s: %s (%s); input kept in %s",
        job.id,
        stage,
        type(exc).__name__,
        exc,
        dest,
    )
