"""Admission by memory: a volume is loaded only when what it costs fits in this machine's
budget for studies beside the volumes being processed, so that a big study waits for the
others instead of pushing a pool process into the kernel's OOM killer, and one that could
never fit fails at once.

A volume's cost is known before it is read: planes x rows x columns, in float32, times
COST_X_VOLUME (the peak beyond the idle footprint that ``python -m pipeline.bench.big_study``
measures across the worker and Triton, rounded up). The budget is ``worker.memory_budget_mb``
or, where that is 0, nine tenths of the memory the machine (or its cgroup) allows less what
is in use while no study runs: the idle footprint of the worker pool, Triton and its models,
and whatever else runs there. It is measured again each time the machine has no study in
flight.

The pool processes of every worker on one machine share one ledger, a folder of
``<pid>-<job>.mb`` files under ``data/memory/<host>/`` read and written under a lock: a
process that dies leaves a file whose pid is gone, and it is not counted.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_bytes, flocked

log = logging.getLogger(__name__)

COST_X_VOLUME = 3.0  # a volume's peak beyond idle, in multiples of its float32 size
SHARE_OF_LIMIT = 0.9  # of the machine's memory: the kernel, page cache and slack keep the rest
POLL_S = 0.5


@dataclass(frozen=True)
class Budget:
    studies_mb: int  # what the studies in flight may use together
    limit_mb: int  # the machine's memory, or its cgroup's limit
    idle_mb: int  # in use while no study ran (0 where the budget is set)
    measured: str  # when, ISO 8601 UTC
    configured: bool  # worker.memory_budget_mb, not measured


def volume_cost_mb(voxels: int) -> int:
    """What processing a volume of this many voxels costs beyond the idle footprint, in MB."""
    return int(voxels * 4 * COST_X_VOLUME / 2**20) + 1


def memory_limit_and_used_mb() -> tuple[int, int]:
    """The memory this machine allows (its cgroup's limit where there is one) and how much of
    it is in use, in MB."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0]) // 1024  # kB
    limit, used = info["MemTotal"], info["MemTotal"] - info["MemAvailable"]
    cgroup = Path("/sys/fs/cgroup")
    with suppress(OSError, ValueError):
        bound = (cgroup / "memory.max").read_text().strip()
        if bound != "max" and int(bound) // 2**20 < limit:
            limit = int(bound) // 2**20
            used = int((cgroup / "memory.current").read_text()) // 2**20
    return limit, used


class Ledger:
    """The reservations of one machine's pool processes, and its budget."""

    def __init__(self, folder: Path, budget_mb: int = 0) -> None:
        self.folder = folder
        self.budget_mb = budget_mb
        folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_host(cls, data_dir: Path, budget_mb: int = 0) -> Ledger:
        return cls(data_dir / "memory" / socket.gethostname(), budget_mb)

    def reserved(self) -> dict[str, int]:
        """The live reservations, MB by ``<pid>-<job>``; those of dead processes removed."""
        live = {}
        for path in self.folder.glob("*.mb"):
            pid = int(path.stem.split("-", 1)[0])
            if _alive(pid):
                with suppress(OSError, ValueError):
                    live[path.stem] = int(path.read_text())
            else:
                path.unlink(missing_ok=True)
        return live

    def state(self) -> tuple[Budget, dict[str, int]]:
        """The budget as last measured (measured now where no study is in flight), and the
        live reservations."""
        with flocked(self.folder / ".lock"):
            reserved = self.reserved()
            return self._budget(reserved), reserved

    def _budget(self, reserved: dict[str, int]) -> Budget:
        path = self.folder / "budget.json"
        if self.budget_mb:
            limit, _ = memory_limit_and_used_mb()
            return Budget(self.budget_mb, limit, 0, _now(), configured=True)
        if reserved and path.exists():  # studies in flight: their memory is not idle
            with suppress(OSError, ValueError, TypeError):
                return Budget(**json.loads(path.read_text()))
        limit, used = memory_limit_and_used_mb()
        budget = Budget(max(0, int(limit * SHARE_OF_LIMIT) - used), limit, used, _now(), False)
        atomic_write_bytes(path, json.dumps(asdict(budget)).encode())
        return budget

    @contextmanager
    def admitted(self, job_id: str, cost_mb: int, what: str) -> Iterator[None]:
        """Held while a volume of ``cost_mb`` is processed: entered once it fits beside the
        others (waiting for them meanwhile); InputError at once where it never can."""
        mine = self.folder / f"{os.getpid()}-{job_id}.mb"
        waited = 0.0
        while True:
            with flocked(self.folder / ".lock"):
                reserved = self.reserved()
                budget = self._budget(reserved)
                if cost_mb > budget.studies_mb:
                    raise InputError(_too_big(what, cost_mb, budget))
                if sum(reserved.values()) + cost_mb <= budget.studies_mb:
                    atomic_write_bytes(mine, str(cost_mb).encode())
                    break
            if waited == 0.0:
                log.info(
                    "job %s waits for memory: %s needs about %d MB, %d MB of the %d MB budget "
                    "are taken by %d volume(s) in flight",
                    job_id,
                    what,
                    cost_mb,
                    sum(reserved.values()),
                    budget.studies_mb,
                    len(reserved),
                )
            time.sleep(POLL_S)
            waited += POLL_S
        if waited:
            log.info("job %s admitted after %.1f s waiting for memory", job_id, waited)
        try:
            yield
        finally:
            mine.unlink(missing_ok=True)


def _too_big(what: str, cost_mb: int, budget: Budget) -> str:
    source = (
        "worker.memory_budget_mb"
        if budget.configured
        else f"{SHARE_OF_LIMIT:.0%} of the machine's {budget.limit_mb} MB less "
        f"{budget.idle_mb} MB in use while idle"
    )
    return (
        f"{what} needs about {cost_mb} MB to process ({COST_X_VOLUME:g}x its float32 volume), "
        f"more than this worker's memory budget for studies, {budget.studies_mb} MB ({source}); "
        "process it on a machine with more memory or raise worker.memory_budget_mb"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
