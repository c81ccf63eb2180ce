"""Complete studies and spooled files handed to the queue, each once, nothing lost.

:class:`Producer` is the one place intake meets the broker. The receiver and the inbox watcher
close a complete study with :meth:`Producer.close` (its spool folder becomes a job folder in one
rename, then the job is queued) and queue a dropped file's job with :meth:`Producer.enqueue`.
How a task is sent is given to it (:func:`pipeline.tasks.enqueue.job_sender`): intake never
imports Celery.

A job is sent once: the watcher and the receiver may both offer the same pending job, so each
checks the ``.enqueued`` marker under one lock. A job a worker took (``.processing``) and whose
worker was lost (its lease expired: :mod:`pipeline.tasks.leases`, told through ``lost``) is
offered again under the same id, once. A broker that is down leaves the job in the
spool, offered again by :meth:`Producer.requeue_pending` every few seconds. A broker that hangs
(stopped, overloaded, a network partition) must not hold intake up a timeout per job: after a
send that failed slowly the producer stops trying for :data:`BROKER_COOLDOWN_S`. A refused
connection fails at once and sets no cooldown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.core import observe
from pipeline.core.errors import BrokerUnavailableError
from pipeline.core.fsutil import flocked
from pipeline.core.jobs import (
    ENQUEUED_MARKER,
    PROCESSING_MARKER,
    Job,
    Reason,
    job_dir,
    mark_enqueued,
    now,
    requeue_pending,
    taken_jobs,
)
from pipeline.core.routing import Priority
from pipeline.ingest.completion import Completed, close_study

log = logging.getLogger(__name__)

# Sends a job's task and says which lane it waits in; BrokerUnavailableError if not sent.
Send = Callable[[Job], Priority]
# Whether the worker that took a job was lost (no live lease); BrokerUnavailableError if the
# broker cannot say.
Lost = Callable[[str], bool]

ENQUEUE_LOCK = ".enqueue.lock"
BROKER_COOLDOWN_S = 15.0
SLOW_FAILURE_S = 5.0  # a refused connection fails within the sender's retries (~2 s)


class Producer:
    """Hands jobs of one spool to the queue through ``send``."""

    def __init__(
        self,
        spool: Path,
        send: Send,
        clock: Callable[[], float] = time.monotonic,
        lost: Lost | None = None,
    ):
        self.spool = spool
        self._send = send
        self._clock = clock
        self._lost = lost
        self._down_until = float("-inf")

    def enqueue(self, job: Job) -> bool:
        """Send the job's task; False (the job stays spooled, offered again later) when the
        broker is down. True too for a job sent by another component or already processed."""
        if self._clock() < self._down_until:
            return False  # failed a moment ago: the job waits in the spool for the next offer
        with flocked(self.spool / ENQUEUE_LOCK):
            folder = job_dir(self.spool, job.id)
            if (folder / ENQUEUED_MARKER).exists() or not folder.exists():
                return True
            started = self._clock()
            try:
                lane = self._send(job.model_copy(update={"queued_at": now()}))
            except BrokerUnavailableError as exc:
                if self._clock() - started > SLOW_FAILURE_S:
                    self._down_until = self._clock() + BROKER_COOLDOWN_S
                log.warning("job %s stays spooled, broker unavailable: %s", job.id, exc)
                return False
            mark_enqueued(self.spool, job.id, lane)
        study = job.study.study_uid if job.study else ""
        observe.stage("queued", job=job.id, study=study, priority=lane.value)
        observe.count("queued", job.source)
        return True

    def requeue_pending(self) -> None:
        """Offer every spooled, never-queued job, oldest first (at start-up, and every few
        seconds while the broker is away); then every job whose worker was lost."""
        requeue_pending(self.enqueue, self.spool)
        if self._lost is not None and self._clock() >= self._down_until:
            for job in taken_jobs(self.spool):
                if not self._offer_lost(job, self._lost):
                    return

    def _offer_lost(self, job: Job, lost: Lost) -> bool:
        """Offer ``job`` again if its worker was lost; False when the broker is away."""
        marker = job_dir(self.spool, job.id) / PROCESSING_MARKER
        try:
            with flocked(self.spool / ENQUEUE_LOCK):
                # Asked under the lock: the receiver and the watcher both look.
                if not marker.exists() or not lost(job.id):
                    return True
                lane = self._send(job.model_copy(update={"queued_at": now()}))
                marker.unlink(missing_ok=True)  # queued again: not lost a second time
        except BrokerUnavailableError as exc:
            log.warning("job %s: its worker may be lost; broker unavailable: %s", job.id, exc)
            return False
        study = job.study.study_uid if job.study else ""
        log.warning("job %s: the worker processing it was lost; offered again", job.id)
        observe.stage("redelivered", job=job.id, study=study, priority=lane.value)
        observe.count("redelivered")
        return True

    def close(self, done: Completed) -> Job | None:
        """The complete study's spool folder becomes a job, which is queued; None when the
        folder held nothing (closed already). OSError: the study stays in the spool."""
        job = close_study(self.spool, done)
        if job is None or job.study is None:
            return None
        sender = {} if done.reason is Reason.INBOX else {"calling_aet": done.calling_aet or "?"}
        observe.stage(
            "received",
            job=job.id,
            study=done.study_uid,
            seconds=(now() - job.received_at).total_seconds(),
            completed_by=done.reason.value,
            instances=job.study.instances,
            series=len(job.study.series),
            **sender,
        )
        self.enqueue(job)
        return job
