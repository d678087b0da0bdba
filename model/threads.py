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
        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    _applied.n = n


def use_threads(n: int) -> None:
    """`set_threads(n)` in the calling thread, unless it already did: cheap on every request."""
    if getattr(_applied, "n", None) != n:
        set_threads(n)


def torch_threads_default() -> int:
    """torch's process-wide thread count, as a thread started now would get it."""
    out = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


def background_thread(n: int, nice: int) -> None:
    """Make the calling thread a background worker: `n` threads for its own torch, faiss
    and numba work, at a lower priority (Linux schedules threads one by one).

    `torch.set_num_threads` also sets the default of threads yet to come (request threads):
    that default is put back from a throwaway thread, which leaves this thread's own.
    """
    default = torch_threads_default()
    set_threads(n)
    restore = threading.Thread(target=torch.set_num_threads, args=(default,))
    restore.start()
    restore.join()
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        pass


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
