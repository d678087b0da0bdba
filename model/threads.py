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
