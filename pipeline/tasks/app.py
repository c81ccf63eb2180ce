"""The Celery application: configured for no loss, JSON messages only.

``acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after the task
has finished, so a worker killed mid-task leaves it to be redelivered. Prefetch 1: a busy
worker holds no queued work hostage. Producers (the watcher) only ``send_task`` by name and
never import the task code.

Two queues, two lanes (:mod:`pipeline.tasks.lanes`): ``pipeline.urgent`` for jobs an urgent route
takes, ``pipeline`` for the rest. A worker names the urgent one first and Redis is asked for
the queues in that order every time (kombu's ``priority`` queue order; its default rotates
them, which would let a backlog of routine jobs take turns with urgent ones).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from pipeline.core import observe
from pipeline.core.fsutil import flocked
from pipeline.core.jobs import ENQUEUED_MARKER, Job, job_dir, mark_enqueued, now
from pipeline.core.routing import Priority
from pipeline.core.settings import Settings
from pipeline.tasks.lanes import priority_of

log = logging.getLogger(__name__)

TASK_NAME = "pipeline.process_job"
QUEUE = "pipeline"
URGENT_QUEUE = "pipeline.urgent"
QUEUES: dict[Priority, str] = {Priority.URGENT: URGENT_QUEUE, Priority.ROUTINE: QUEUE}
# Redis redelivers an unacknowledged task after this long; it must exceed the longest task
# plus the longest retry countdown, or a slow task would run twice.
VISIBILITY_TIMEOUT_S = 3600
ENQUEUE_LOCK = ".enqueue.lock"
# A Redis that hangs (stopped, overloaded, a network partition) must not hang the watcher or
# the receiver: calls give up after these; and after a send that failed slowly, producers
# stop trying for BROKER_COOLDOWN_S (the job waits in the spool; the periodic re-offer sends
# it later), so intake is not held up a timeout per job. A refused connection fails at once
# and sets no cooldown.
BROKER_SOCKET_TIMEOUT_S = 5.0
BROKER_CONNECT_TIMEOUT_S = 3.0
BROKER_COOLDOWN_S = 15.0
_SLOW_FAILURE_S = 5.0  # a refused connection fails within the retry policy's ~2 s
_broker_down_until = 0.0


def make_celery(settings: Settings, broker_url: str) -> Celery:
    app = Celery("dicom_pipeline", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_max_memory_per_child=_kib(settings.worker.max_memory_per_process_mb),
        # A pool process reports for work after its start-up (tasks._init_process), and
        # Celery kills one that has not within this time: the prefault's included.
        worker_proc_alive_timeout=settings.worker.process_start_limit_s,
        task_default_queue=QUEUE,
        task_soft_time_limit=settings.worker.task_soft_time_limit_s,
        task_time_limit=settings.worker.task_time_limit_s,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
            "queue_order_strategy": "priority",
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def _kib(mb: int | None) -> int | None:
    return mb * 1024 if mb is not None else None


def worker_queues(lanes: tuple[Priority, ...]) -> str:
    """The worker's ``--queues``: urgent first, whatever order the lanes were named in."""
    return ",".join(QUEUES[p] for p in (Priority.URGENT, Priority.ROUTINE) if p in lanes)


def lane_of(delivery_info: dict[str, Any] | None) -> Priority | None:
    """The lane of the queue a task was taken from (Celery's ``request.delivery_info``)."""
    queue = (delivery_info or {}).get("routing_key")
    return next((lane for lane, name in QUEUES.items() if name == queue), None)


def enqueue(app: Celery, settings: Settings, job: Job) -> bool:
    """Send the job's task; False (job stays spooled, retried later) when Redis is down."""
    if time.monotonic() < _broker_down_until:
        return False  # failed a moment ago: the job waits in the spool for the next re-offer
    # The watcher and the receiver may both offer the same pending job: one at a time, each
    # checking the marker under the lock, so a job is sent once.
    with flocked(settings.spool_dir / ENQUEUE_LOCK):
        folder = job_dir(settings.spool_dir, job.id)
        if (folder / ENQUEUED_MARKER).exists() or not folder.exists():
            return True  # sent by another component, or already processed
        return _send(app, settings, job)


def _send(app: Celery, settings: Settings, job: Job) -> bool:
    global _broker_down_until
    message = job.model_copy(update={"queued_at": now()}).model_dump(mode="json")
    priority = priority_of(settings.routes, settings.spool_dir, job)
    started = time.monotonic()
    try:
        app.send_task(
            TASK_NAME,
            args=[message],
            task_id=job.id,
            queue=QUEUES[priority],
            retry=True,
            retry_policy={
                "max_retries": 2,
                "interval_start": 0.2,
                "interval_step": 0.5,
                "interval_max": 1.0,
            },
        )
    except (OperationalError, OSError, TimeoutError) as exc:
        if time.monotonic() - started > _SLOW_FAILURE_S:
            _broker_down_until = time.monotonic() + BROKER_COOLDOWN_S
        log.warning("job %s stays spooled, broker unavailable: %s", job.id, exc)
        return False
    mark_enqueued(settings.spool_dir, job.id, priority)
    study = job.study.study_uid if job.study else ""
    observe.stage("queued", job=job.id, study=study, priority=priority.value)
    observe.count("queued", job.source)
    return True
