"""A worker process: Celery's prefork pool over the tasks, warmed up before it forks, its
metrics endpoint with the queues' depths, and a marker in the run folder once its pool
processes take jobs (`up` says "ready" only from then on)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from pipeline.core.fsutil import atomic_write_bytes
from pipeline.core.routing import Priority
from pipeline.core.settings import Settings
from pipeline.ops import metrics
from pipeline.tasks import broker
from pipeline.tasks.app import QUEUE, URGENT_QUEUE, make_celery, worker_queues

log = logging.getLogger(__name__)


def component(lanes: tuple[Priority, ...]) -> str:
    """A worker of the urgent lane alone has an endpoint of its own: it may run beside one for
    both lanes on the same machine (`up`, worker.urgent_concurrency)."""
    return "urgent_worker" if lanes == (Priority.URGENT,) else "worker"


def ready_marker(lanes: tuple[Priority, ...]) -> str:
    """In the run folder: the process id of a worker taking jobs, one file per set of lanes
    (`up` may run a worker for both and one for the urgent lane only)."""
    return "worker.ready" if set(lanes) == set(Priority) else f"worker-{lanes[0]}.ready"


def run(settings: Settings, lanes: tuple[Priority, ...], triton_url: str) -> None:
    """Take jobs of ``lanes`` (urgent first) until Celery is stopped. ``metrics.prepare`` has
    run in this process (before anything imported prometheus_client)."""
    # Here, not at the top: `up` imports this module for ready_marker, and must not load the
    # task code's torch and MONAI into its own process.
    from celery.signals import worker_ready

    from pipeline.tasks.worker import register_tasks, wait_for_pool, warm_up_before_fork

    broker_url = broker.broker_url(settings)
    celery = make_celery(settings, broker_url)
    warm_up_before_fork(register_tasks(celery, settings, triton_url))

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _taking_jobs(**_: Any) -> None:
        # For `up`, which says "ready" only from here on: a study sent at once would otherwise
        # wait for the worker's start-up (2.9 s of the first study's 11 s in the end-to-end
        # benchmark), and its pool processes' (worker.prefault_mb).
        def once_pool_started() -> None:
            if not wait_for_pool(settings):
                log.warning("the worker's pool processes have not all started; ready anyway")
            atomic_write_bytes(settings.run_dir / ready_marker(lanes), str(os.getpid()).encode())

        threading.Thread(target=once_pool_started, name="ready", daemon=True).start()

    depth = metrics.QueueDepth(broker_url, (URGENT_QUEUE, QUEUE))
    metrics.serve(settings, component(lanes), (depth,))
    celery.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--concurrency={settings.worker.concurrency}",
            "--pool=prefork",
            f"--queues={worker_queues(lanes)}",
            "--without-gossip",
            "--without-mingle",
            f"--hostname=pipeline-{os.getpid()}@%h",
        ]
    )
