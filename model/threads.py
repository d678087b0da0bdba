"""One setting for the CPU threads of torch (the network), faiss (k-means, HNSW) and numba (the scan)."""

import faiss
import numba
import torch


def set_threads(n: int) -> None:
    """Use n threads everywhere; 0 keeps each library's default (all cores)."""
    if n:
        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
