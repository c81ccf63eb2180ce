"""Leases: which worker is processing which job, renewed while it works, so that a worker that
is lost (killed by the OOM killer, its pod evicted, its node gone, hung) is noticed within
seconds and its job offered again, instead of after the broker's visibility timeout (an hour).

A job's lease is the Redis key ``pipeline:lease:<job id>``, holding the name of the process
working on it. A worker takes it when it starts a job, only if no live lease exists
(``SET NX``), with an expiry of :data:`LEASE_S`, and a thread of that same process renews it
every :data:`RENEW_S` while the job runs: the lease lives exactly as long as the work can go
on. Redis expires it on its own clock, so workers on several machines need no common clock.

What a lease decides:

- a delivery of a job whose lease is live is dropped (acknowledged, not run): the job is being
  processed. This is what keeps a job that runs longer than the broker's visibility timeout
  from being run a second time when Redis hands its message out again;
- a job a worker has taken (``.processing`` in its spool folder) whose lease has expired was
  lost with its worker: the receiver and the inbox watcher, which look every few seconds
  (:meth:`pipeline.ingest.handover.Producer.requeue_pending`), offer it again under the same id.
  The job id makes the work idempotent: the lost worker's own message, if Redis hands it out
  later, finds the job done and is acknowledged.

Redis stays the queue; the lease only says who is working.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from pipeline.core.errors import BrokerUnavailableError
from pipeline.core.jobs import JOB_FILE

log = logging.getLogger(__name__)

LEASE_S = 15.0  # a worker silent this long is lost
RENEW_S = 3.0
PREFIX = "pipeline:lease:"

# Renew or give back only a lease that is still ours: one that expired while Redis was away
# may have been taken by the worker the job was offered to again.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def holder_name() -> str:
    """This process, as a lease names it."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Leases:
    """The job leases in one Redis (the broker's)."""

    def __init__(self, client: redis.Redis, seconds: float = LEASE_S) -> None:
        self._client = client
        self._ms = int(seconds * 1000)

    def take(self, job_id: str, holder: str) -> str | None:
        """None when the lease is now ``holder``'s; else the live holder's name."""
        key = PREFIX + job_id
        for _ in range(2):  # the holder's lease may expire between the two calls
            if self._client.set(key, holder, nx=True, px=self._ms):
                return None
            current = self._client.get(key)
            if current is not None:
                return bytes(current).decode(errors="replace")
        return "unknown"

    def renew(self, job_id: str, holder: str) -> bool:
        key = PREFIX + job_id
        return bool(self._client.eval(_RENEW, 1, key, holder, self._ms))  # type: ignore[no-untyped-call]

    def release(self, job_id: str, holder: str) -> None:
        self._client.eval(_RELEASE, 1, PREFIX + job_id, holder)  # type: ignore[no-untyped-call]

    def lost(self, job_id: str) -> bool:
        """Whether no worker holds the job's lease now: a taken job's worker was lost.
        BrokerUnavailableError when Redis cannot say."""
        try:
            return not self._client.exists(PREFIX + job_id)
        except (redis.RedisError, OSError) as exc:
            raise BrokerUnavailableError(str(exc)) from exc


@contextmanager
def holding(leases: Leases | None, job_id: str) -> Iterator[str | None]:
    """The job's lease for the block, renewed meanwhile: yields None; or the name of the live
    holder, and then the block must not run the job. Without leases (none configured, or Redis
    unable to answer) the block runs: the job lock (:mod:`pipeline.tasks.worker`) still keeps
    two workers from running one job at once."""
    holder = holder_name()
    try:
        other = leases.take(job_id, holder) if leases is not None else None
    except (redis.RedisError, OSError) as exc:
        log.warning("job %s: no lease taken (%s); processed without", job_id, exc)
        leases = None
        other = None
    if leases is None or other is not None:
        yield other
        return
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(leases, job_id, holder, stop), name="lease", daemon=True
    )
    renewer.start()
    try:
        yield None
    finally:
        stop.set()
        renewer.join()
        try:
            leases.release(job_id, holder)
        except (redis.RedisError, OSError) as exc:
            log.warning("job %s: lease not given back (%s); it expires", job_id, exc)


def _renew(leases: Leases, job_id: str, holder: str, stop: threading.Event) -> None:
    while not stop.wait(RENEW_S):
        try:
            if not leases.renew(job_id, holder):
                log.warning("job %s: lease lost to another worker while processing", job_id)
                return
        except (redis.RedisError, OSError) as exc:
            log.warning("job %s: lease not renewed (%s); trying again", job_id, exc)


@contextmanager
def job_lock(folder: Path) -> Iterator[bool]:
    """True: this process alone works on the job in ``folder`` until the block ends; False: the
    job has left the spool (done or failed). A lock on the job's own ``job.json``, which moves
    with the folder: a worker given a job that a hung worker still holds waits for it (while
    its own lease says it is alive), then finds the job done, or takes it over once the hung
    one is killed (Celery's time limit, an operator)."""
    try:
        fd = os.open(folder / JOB_FILE, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield (folder / JOB_FILE).exists()
    finally:
        os.close(fd)
