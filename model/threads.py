"""One setting for the CPU threads of torch (the network), faiss (k-means, HNSW) and numba (the scan)."""

import ctypes
import glob
import os
import threading

import faiss
import numpy as np
import numba
import torch

_applied = threading.local()


def set_threads(n: int) -> None:
    """Use n threads everywhere; 0 keeps each library's default (all cores).

    numba's and OpenMP's (faiss's) counts belong to the calling thread: a thread that
    does the work must call this (or `use_threads`) itself.
    """
    if n:
        faiss.omp_set_num_threads(n)
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        with _torch_lock:  # last (see background_thread)
            torch.set_num_threads(n)
    elif getattr(_applied, "n", None) is None:
        with _torch_lock:  # take torch's default now, not inside another thread's own_torch_threads
            torch.ones(1 << 16).sum()
    _applied.n = n


def use_threads(n: int) -> None:
    """`set_threads(n)` in the calling thread, unless it already did: cheap on every request."""
    if getattr(_applied, "n", None) != n:
        set_threads(n)


_torch_lock = threading.Lock()


def torch_threads_default() -> int:
    """torch's process-wide thread count, as a thread started now would get it."""
    out = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


def own_torch_threads(n: int) -> None:
    """torch uses n threads in the calling thread; threads started later keep the default.

    torch keeps one default for new threads, and `torch.set_num_threads` changes it too.  A
    thread takes its count on its first parallel op, after which the default no longer
    reaches it: so this thread runs one before the default is put back from a throwaway
    thread.
    """
    with _torch_lock:
        default = torch_threads_default()
        torch.set_num_threads(n)
        torch.ones(1 << 16).sum()  # this thread's first parallel op, if it had none
        restore = threading.Thread(target=torch.set_num_threads, args=(default,))
        restore.start()
        restore.join()


def background_thread(n: int, nice: int) -> None:
    """Make the calling thread a background worker: `n` threads for its own torch, faiss
    and numba work (request threads keep theirs), and a priority `nice` steps lower
    (Linux schedules threads one by one)."""
    n = max(1, n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))  # before the nice: numba's pool is shared
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        pass
    # After the nice, so that the OpenMP threads these start for this thread inherit it; torch
    # last: starting numba's thread pool can reset torch's count in this thread.
    faiss.omp_set_num_threads(n)
    own_torch_threads(n)
    _applied.n = n


_blas_checked = False


def numpy_blas_one_thread() -> bool:
    """Make numpy's own OpenBLAS single-threaded (once per process); True if it was found.

    The small-batch decoder is numpy's only BLAS user in this project (torch, faiss and
    numba have their own thread settings).  Left multi-threaded, OpenBLAS splits a d=384
    shortlist's products across the cores on every call: under concurrent requests, or a
    shared CPU, its threads wait on each other (p50 of a 20-row decode 30x its minimum).
    One thread per request is the service's model.  The setting is process-wide (in the
    scipy-openblas build that numpy wheels ship, the "local" variant is not per thread).
    """
    global _blas_checked
    if _blas_checked:
        return True
    _blas_checked = True
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(1)
                return True
    return False
