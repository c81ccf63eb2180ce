"""A pool process keeps the memory it frees (worker.keep_freed_memory): its next study's
large blocks come from pages it already has, not fresh ones the kernel must zero (and, on a
VM whose host reclaims freed memory, must fetch back first)."""

from __future__ import annotations

import subprocess
import sys

# A 64 MB block touched, freed, and allocated again: how many pages the second one faults in.
# numpy's huge-page advice off, as in the worker's pool processes.
_PROBE = """
import resource, sys
import numpy as np
from pipeline.memory import keep_freed_memory
from pipeline.series import numpy_huge_pages
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


def _faults(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


def test_a_pool_process_reuses_the_memory_it_freed() -> None:
    assert _faults("default") >= PAGES // 2  # glibc gave the block back: fresh pages again
    assert _faults("keep") < PAGES // 20
