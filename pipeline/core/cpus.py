"""How many cores this process may use: its CPU affinity and its cgroup's CPU quota (a
container's CPU limit), which ``os.cpu_count`` does not see."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, and no more than the CPU quota of
    its cgroup or an ancestor's (a container's CPU limit), rounded up."""
    cores = len(os.sched_getaffinity(0))
    limit = _cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def _cgroup_cpu_limit() -> int | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        try:
            _, controllers, path = line.split(":", 2)
            here = Path(path)
            levels = [level.relative_to("/") for level in (here, *here.parents)]
        except ValueError:  # not the kernel's "id:controllers:/path": no limit read from it
            continue
        if controllers == "":  # cgroup v2
            root, read = Path("/sys/fs/cgroup"), _v2_quota
        elif "cpu" in controllers.split(","):
            root, read = Path("/sys/fs/cgroup/cpu"), _v1_quota
        else:
            continue
        for level in levels:
            quota = read(root / level)
            if quota is not None:
                quotas.append(quota)
    return max(1, math.ceil(min(quotas))) if quotas else None


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
