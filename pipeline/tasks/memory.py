"""glibc's allocator told to keep the memory a pool process frees, for its next study.

A 200-slice CT study allocates and frees large blocks (the volume, each preprocessing step's
copy, the sliding window's sums): glibc maps each block above its mmap threshold (which
adapts, up to 32 MB) on its own and gives it back to the kernel when it is freed, so the next
study touches fresh pages again, each zeroed by the kernel on its first use: some 250,000
page faults per study. Under a hypervisor that reclaims the memory a guest frees (free page
reporting, as on the project's 2-core CI VM), a first touch costs some 10 µs a page. With
mmap off and the heap never trimmed, the blocks are reused: 50,000-90,000 faults per study,
and the process's resident size stays at its peak, which each study reaches anyway (1.06 GB
for a 200-slice CT of 256x256 under `up`); worker.max_memory_per_process_mb bounds it
(pipeline.tasks.app).

What the first study of a fresh pool process faults in (some 140,000 pages), :func:`prefault`
touches at the process's start instead (worker.prefault_mb), off any study's path.
"""

from __future__ import annotations

import ctypes
import logging
import time

log = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt's int takes: 2 GB free at the top


def keep_freed_memory() -> bool:
    """Large blocks from the heap, freed memory kept; False where the C library (not glibc:
    musl, say) does not take the advice."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    if not kept:
        log.info("the C library does not take malloc advice: freed memory goes back")
    return kept


def prefault(mb: int) -> float | None:
    """Touch ``mb`` MB of heap and free it; with :func:`keep_freed_memory` in force the pages
    stay with the process, and the next allocations are served from them. The seconds it
    took, or None where the C library would not give the block."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    t0 = time.perf_counter()
    block = libc.malloc(mb << 20)
    if not block:
        return None
    try:
        ctypes.memset(block, 0, mb << 20)  # every page written: each one faulted in now
    finally:
        libc.free(block)
    return time.perf_counter() - t0
