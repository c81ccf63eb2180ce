"""A pool process keeps the memory it frees (worker.keep_freed_memory): its next study's
large blocks come from pages it already has, not fresh ones the kernel must zero (and, on a
VM whose host reclaims freed memory, must fetch back first). What it keeps is bounded: a
process above worker.max_memory_per_process_mb after a task is replaced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.demo.synthetic import write_mednist_png
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.runtime.process import free_port

from .conftest import running_up, up_env, wait_for

# A 64 MB block touched, freed, and allocated again: how many pages the second one faults in.
# numpy's huge-page advice off, as in the worker's pool processes.
_PROBE = """
import resource, sys
import numpy as np
from pipeline.tasks.memory import keep_freed_memory
from pipeline.convert.series import numpy_huge_pages
numpy_huge_pages(False)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
block = np.ones(64 << 20, np.uint8)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = np.ones(64 << 20, np.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (64 << 20) // 4096

# A fresh process that keeps what it frees: how many pages its first 64 MB block faults in,
# with and without 80 MB prefaulted at its start (worker.prefault_mb).
_FIRST = """
import resource, sys
import numpy as np
from pipeline.tasks.memory import keep_freed_memory, prefault
from pipeline.convert.series import numpy_huge_pages
numpy_huge_pages(False)
assert keep_freed_memory()
if sys.argv[1] == "prefault":
    assert prefault(80) is not None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = np.ones(64 << 20, np.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, probe: str = _PROBE) -> int:
    run = subprocess.run(
        [sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


def test_a_pool_process_reuses_the_memory_it_freed() -> None:
    assert _faults("default") >= PAGES // 2  # glibc gave the block back: fresh pages again
    assert _faults("keep") < PAGES // 20


def test_a_prefaulted_pool_process_serves_its_first_large_block_from_pages_it_has() -> None:
    assert _faults("fresh", _FIRST) >= PAGES // 2
    assert _faults("prefault", _FIRST) < PAGES // 20


def test_a_pool_process_above_its_memory_bound_is_replaced(
    model_repository: Path, tmp_path: Path
) -> None:
    """One pool process, a bound (256 MB) below what it holds after any task (torch alone is
    more): each of two images dropped one after the other is classified by a process of its
    own, which result.json names."""
    env = up_env(tmp_path, model_repository, free_port())
    env.update(
        PIPELINE_WORKER__CONCURRENCY="1",
        PIPELINE_WORKER__MAX_MEMORY_PER_PROCESS_MB="256",
        PIPELINE_WORKER__PREFAULT_MB="64",  # below the bound, as the settings require
    )
    results = tmp_path / "data" / "results"
    pids = []
    with running_up(tmp_path, env):
        # Ready means its pool process has started, prefaulted memory included: else the
        # first study would wait for it.
        log = (tmp_path / "data" / "run" / "logs" / "worker.log").read_text()
        assert "64 MB of memory made ready" in log
        for i in range(2):
            write_mednist_png(
                tmp_path / "data" / "inbox" / f"hand{i}.png", "Hand", TEST_SEED_BASE + 740 + i
            )
            wait_for(
                lambda n=i + 1: len(list(results.rglob("result.json"))) >= n,
                120,
                f"image {i}'s result",
            )
        for path in results.rglob("result.json"):
            pids.append(json.loads(path.read_text())["worker"]["pid"])
    assert len(pids) == 2 and pids[0] != pids[1]
