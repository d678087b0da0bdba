"""One setting for the CPU threads of torch (the network), faiss (k-means, HNSW) and numba (the scan)."""

import threading

import faiss
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
