"""The allocator, set so that memory a load frees goes back to the system.

glibc's malloc serves large blocks (numpy arrays of a write batch, encode buffers, SQLite
rows read in bulk) by mmap, until a freed block raises its threshold: then blocks of up to
32 MiB come from the heap, which a long run of writes fragments and rarely shrinks.  Measured
(bench/RESULTS.md, issue #26): 1M points added in batches of 1,000 left 79 bytes of RSS per
point with the default, 18 with the threshold fixed (17 of them the codes and ids).

Free blocks in the middle of the heap stay resident, though, until `malloc_trim` hands their pages
back: the service calls it (`release_free_memory`) after the work that frees much at once, a
model's swap, whose transaction reads and writes every point's row.

numpy asks for transparent huge pages on its large arrays (madvise, on kernels set to
"madvise"): then touching one row of a list's room makes 2 MiB resident.  The service turns
that off: 1M points in the lists cost 23.0 bytes each with huge pages and 20.7 without
(bench/RESULTS.md, session 14).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("qinco.memory")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value; fixing it stops the dynamic raise


def fix_malloc_thresholds() -> bool:
    """Blocks of MMAP_THRESHOLD and more from mmap (returned when freed), the heap trimmed
    past 1 MiB free.  False (and nothing done) where the C library is not glibc."""
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 20) == 1
    if not ok:
        log.warning("mallopt refused the thresholds: freed memory may stay with the process")
    return ok


@functools.cache  # find_library runs ldconfig
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_free_memory() -> bool:
    """Give the pages of the heap's free blocks back to the system (glibc's malloc_trim).
    False (nothing done) where the C library is not glibc."""
    try:
        trim = _libc().malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def no_huge_pages_for_arrays() -> bool:
    """Stop numpy from asking for transparent huge pages (see the module's docstring).
    False (nothing done) where this numpy has no such switch."""
    import numpy as np
    core = getattr(np, "_core", None) or getattr(np, "core", None)  # numpy 2 / 1
    switch = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if switch is None:
        return False
    switch(False)
    return True
