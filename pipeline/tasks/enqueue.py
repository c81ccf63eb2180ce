"""Tasks sent by name: a spooled job's, in its lane's queue, and a route's results to send.

:func:`producer` gives the receiver, the inbox watcher and ``failed retry`` their
:class:`~pipeline.ingest.handover.Producer`, sending through Celery; nothing here imports the
task code.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu.exceptions import OperationalError

from pipeline.core.errors import BrokerUnavailableError, TransientError
from pipeline.core.jobs import Job
from pipeline.core.routing import Priority, Route
from pipeline.core.settings import Settings
from pipeline.ingest.handover import Producer, Send
from pipeline.outputs.send.dispatch import Delivery
from pipeline.tasks.app import DISPATCH_TASK, QUEUES, TASK_NAME, make_celery
from pipeline.tasks.broker import broker_url, client
from pipeline.tasks.lanes import priority_of
from pipeline.tasks.leases import Leases

# Kept short: a producer must not be held up (pipeline.ingest.handover).
_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def producer(settings: Settings, app: Celery | None = None) -> Producer:
    """Jobs of ``settings``' spool to its broker (``app``'s, if given); jobs whose worker was
    lost offered again (:mod:`pipeline.tasks.leases`)."""
    celery = app if app is not None else make_celery(settings, broker_url(settings))
    url = str(celery.conf.broker_url)
    lost = Leases(client(url)).lost if url.startswith("redis") else None
    return Producer(settings.spool_dir, job_sender(celery, settings), lost=lost)


def job_sender(app: Celery, settings: Settings) -> Send:
    """Sends a job's task to the queue of its lane (:mod:`pipeline.tasks.lanes`)."""

    def send(job: Job) -> Priority:
        priority = priority_of(settings.routes, settings.spool_dir, job)
        try:
            app.send_task(
                TASK_NAME,
                args=[job.model_dump(mode="json")],
                task_id=job.id,
                queue=QUEUES[priority],
                retry=True,
                retry_policy=_RETRY_POLICY,
            )
        except (OperationalError, OSError, TimeoutError) as exc:
            raise BrokerUnavailableError(str(exc)) from exc
        return priority

    return send


def offer(app: Celery, settings: Settings, job_id: str, route: Route, files: list[Path]) -> None:
    """Queue the sending of ``files`` to each of the route's destinations."""
    if not files:
        return
    names = [str(p.relative_to(settings.results_dir)) for p in files]
    for destination in route.send_to:
        delivery = Delivery(
            job_id=job_id, destination=destination, files=names, priority=route.priority
        )
        queue_delivery(app, delivery)


def queue_delivery(app: Celery, delivery: Delivery) -> None:
    try:
        app.send_task(
            DISPATCH_TASK,
            args=[delivery.model_dump(mode="json")],
            queue=QUEUES[delivery.priority],
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_max": 1.0},
        )
    except (OperationalError, OSError) as exc:
        raise TransientError(f"cannot queue the sending to {delivery.destination}: {exc}") from exc
