"""The Celery application: configured for no loss, JSON messages only.

``acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after the task
has finished, so a worker killed mid-task leaves it to be redelivered. Prefetch 1: a busy
worker holds no queued work hostage. Producers (the watcher, the receiver:
:mod:`pipeline.tasks.enqueue`) only ``send_task`` by name and never import the task code.

Two queues, two lanes (:mod:`pipeline.tasks.lanes`): ``pipeline.urgent`` for jobs an urgent route
takes, ``pipeline`` for the rest. A worker names the urgent one first and Redis is asked for
the queues in that order every time (kombu's ``priority`` queue order; its default rotates
them, which would let a backlog of routine jobs take turns with urgent ones).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from pipeline.core.routing import Priority
from pipeline.core.settings import Settings

TASK_NAME = "pipeline.process_job"
DISPATCH_TASK = "pipeline.dispatch"  # sends a route's results to one destination
QUEUE = "pipeline"
URGENT_QUEUE = "pipeline.urgent"
QUEUES: dict[Priority, str] = {Priority.URGENT: URGENT_QUEUE, Priority.ROUTINE: QUEUE}
# Redis hands an unacknowledged task out again after this long: a lost worker's (whose job is
# offered again within seconds anyway, pipeline.tasks.leases), or a slow task's, which the
# job's live lease keeps from a second run.
VISIBILITY_TIMEOUT_S = 3600
# A Redis that hangs (stopped, overloaded, a network partition) must not hang the watcher or
# the receiver: calls give up after these (and the producer then waits a while before trying
# again: pipeline.ingest.handover).
BROKER_SOCKET_TIMEOUT_S = 5.0
BROKER_CONNECT_TIMEOUT_S = 3.0


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
