"""The fixed-table scan of inverted lists, with one look-up table per query.

A vector in list l with code (i_1 .. i_M) is approximated by c_l + r, r = sum_m T_m[i_m]:

    ||q - c_l - r||² = ||q - c_l||² + ||r||² + sum_m (2 <c_l, T_m[i_m]> - 2 <q, T_m[i_m]>)
                       coarse        stored    per-list term            per-query term

faiss's additive-quantizer IVF scanner builds a table <q - c_l, T_m> for every probed
list (M x K x d multiply-adds each: at d = 384 that costs more than scanning the list).
Here the per-query term is one matmul for all lists, and the per-list term is computed
once per index, as faiss's IVF-PQ does with its "precomputed tables", and held as 16-bit
fixed point with a step per list (2 x nlist x M x K bytes: 64 MiB at 16,384 lists and M = 8,
where float32 would cost 13 B a point at 10M).  The distances are faiss's own within that rounding
(tests/test_index.py checks them against `index.search`), with ||r||² read from faiss's
8-bit norm byte.

The lists are the index's own (model/lists.py: one arena of codes, each list a run of rows),
so that the numba kernel reads plain arrays, and the codes are held once.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .lists import ListStore
from .threads import numpy_blas_one_thread

# The service scans from several request threads at once: numba's fallback "workqueue"
# layer aborts on concurrent launches, so insist on OpenMP (libgomp) or TBB.
numba.config.THREADING_LAYER = "threadsafe"


def norm_of_byte(norm_min: float, norm_max: float) -> np.ndarray:
    """faiss's 8-bit norm code -> ||r||² (AdditiveQuantizer::decode_qint8), (256,) float32."""
    return ((np.arange(256) + 0.5) / 256 * (norm_max - norm_min) + norm_min).astype(np.float32)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    There the query table is a bf16 matmul: 2x faster at d = 384, where it is half the
    cost of a low-nprobe search, with no recall change on either benchmark set
    (bench/RESULTS.md); elsewhere bf16 is emulated, slower than float32.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu has no public test
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def scan_tables(tables: np.ndarray, bf16: bool) -> torch.Tensor:
    """(M, K, d) -> -2 T as an (M * K, d) matrix, made once per index for query_tables."""
    M, K, d = tables.shape
    t = -2 * torch.from_numpy(np.ascontiguousarray(tables, dtype=np.float32)).view(M * K, d)
    return t.bfloat16() if bf16 else t


def query_tables(queries: np.ndarray, tables: torch.Tensor, M: int) -> np.ndarray:
    """-2 <q, T_m[k]>: (nq, d) and scan_tables (M * K, d) -> (nq, M, K) float32."""
    if len(queries) < PARALLEL_SCAN and tables.dtype == torch.float32:  # numpy: no torch dispatch (~15 µs)
        numpy_blas_one_thread()
        return (queries @ tables.numpy().T).reshape(len(queries), M, -1)
    products = torch.from_numpy(queries).to(tables.dtype) @ tables.T
    return products.float().view(len(queries), M, -1).numpy()


LIST_CHUNK = 1024  # lists whose float32 terms are computed at once (8 MiB at M = 8, K = 256), in place


def list_terms(centroids: np.ndarray, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2 <c_l, T_m[k]> as 16-bit fixed point: (nlist, d), (M, K, d) -> terms (nlist, M, K) int16
    and steps (nlist,) float32, the term being terms * step (step = the list's largest |term| /
    32767, so the rounding error, <= step / 2, is 2^-16 of it at most).  Non-finite terms: ValueError (they
    would make every distance in their list NaN, and the list unreachable)."""
    M, K = tables.shape[:2]
    t = scan_tables(tables, bf16=False)
    terms = np.empty((len(centroids), M, K), dtype=np.int16)
    steps = np.empty(len(centroids), dtype=np.float32)
    for l0 in range(0, len(centroids), LIST_CHUNK):
        c = np.ascontiguousarray(centroids[l0:l0 + LIST_CHUNK], dtype=np.float32)
        exact = query_tables(c, t, M)  # -2 <c_l, T_m[k]>
        peak = np.abs(exact).max(axis=(1, 2))
        if not np.isfinite(peak).all():
            raise ValueError("the centroids or the tables hold NaN or infinite values")
        step = np.where(peak > 0, peak / 32767, 1).astype(np.float32)  # an all-zero list: any step
        exact /= -step[:, None, None]
        terms[l0:l0 + len(c)] = np.rint(exact, out=exact)
        steps[l0:l0 + len(c)] = step
    return terms, steps


PARALLEL_SCAN = 8  # queries from which the scan runs on numba's thread team


def scan(qtables: np.ndarray, coarse_dis: np.ndarray, probes: np.ndarray, lterms: tuple[np.ndarray, np.ndarray],
         norms: np.ndarray, lists: ListStore, n: int, allowed: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """The n nearest codes of each query's probed lists by table distance.

    qtables (nq, M, K), coarse_dis and probes (nq, nprobe) from the coarse quantizer
    (probes -1: none), lterms from list_terms, norms (256,); allowed: None, or a bool mask
    over the rows of `lists` (a filter: other rows never take a place).  Returns distances
    (nq, n) float32, ascending, and rows of `lists` (nq, n) int64; +inf and -1 past the end.
    """
    nq = len(qtables)
    dis = np.full((nq, n), np.inf, dtype=np.float32)
    rows = np.full((nq, n), -1, dtype=np.int64)
    mask = np.zeros(0, dtype=np.bool_) if allowed is None else np.ascontiguousarray(allowed, dtype=np.bool_)
    if n and nq:
        kernel = _scan if nq >= PARALLEL_SCAN else _scan_serial
        terms, steps = lterms
        kernel(qtables, np.ascontiguousarray(coarse_dis, dtype=np.float32), np.ascontiguousarray(probes),
              terms, steps, norms, lists.starts, lists.sizes, lists.codes, mask, dis, rows)
    return dis, rows


@numba.njit(parallel=True, cache=True, nogil=True)
def _scan(qtables, coarse_dis, probes, lterms, lsteps, norms, starts, sizes, codes, allowed, dis, rows):
    for q in numba.prange(len(probes)):
        _scan_query(q, qtables, coarse_dis, probes, lterms, lsteps, norms, starts, sizes, codes, allowed, dis, rows)


@numba.njit(cache=True, nogil=True)
def _scan_serial(qtables, coarse_dis, probes, lterms, lsteps, norms, starts, sizes, codes, allowed, dis, rows):
    """`_scan` in the calling thread: a few queries do not pay for waking a thread team
    (in a request thread, with the other core busy, that wake-up cost 10x the scan itself)."""
    for q in range(len(probes)):
        _scan_query(q, qtables, coarse_dis, probes, lterms, lsteps, norms, starts, sizes, codes, allowed, dis, rows)


@numba.njit(inline="always")
def _scan_query(q, qtables, coarse_dis, probes, lterms, lsteps, norms, starts, sizes, codes, allowed, dis, rows):
    nprobe = probes.shape[1]
    M, K = qtables.shape[1], qtables.shape[2]
    n = dis.shape[1]
    table = np.empty((M, K), dtype=np.float32)
    heap_dis, heap_rows = dis[q], rows[q]  # max-heap on distance, root = worst kept
    for j in range(nprobe):
        l = probes[q, j]
        if l < 0:
            continue
        step = lsteps[l]
        for m in range(M):
            for k in range(K):
                table[m, k] = lterms[l, m, k] * step + qtables[q, m, k]
        bias = coarse_dis[q, j]
        filtered = allowed.shape[0] > 0
        for r in range(starts[l], starts[l] + sizes[l]):
            if filtered and not allowed[r]:
                continue
            d = bias + norms[codes[r, M]]
            for m in range(M):
                d += table[m, codes[r, m]]
            if d < heap_dis[0]:
                _sift_down(heap_dis, heap_rows, d, r, n)
    _sort_heap(heap_dis, heap_rows, n)


@numba.njit(inline="always")
def _sift_down(hd, hr, d, r, end):
    """Put (d, r) at the root of the max-heap hd[:end], hr[:end] and sift it down."""
    i = 0
    while True:
        c = 2 * i + 1
        if c >= end:
            break
        if c + 1 < end and hd[c + 1] > hd[c]:
            c += 1
        if hd[c] <= d:
            break
        hd[i], hr[i] = hd[c], hr[c]
        i = c
    hd[i], hr[i] = d, r


@numba.njit
def _sort_heap(hd, hr, n):
    """Heapsort in place: the max-heap becomes ascending (+inf, -1 entries last)."""
    for end in range(n - 1, 0, -1):
        d, r = hd[end], hr[end]
        hd[end], hr[end] = hd[0], hr[0]
        _sift_down(hd, hr, d, r, end)


def warm_up() -> None:
    """Compile the scan (seconds the first time on a machine, then loaded from numba's cache;
    free once done in this process)."""
    empty = ListStore(1, 2)
    for nq in (1, PARALLEL_SCAN):  # both kernels
        scan(np.zeros((nq, 1, 256), np.float32), np.zeros((nq, 1), np.float32), np.zeros((nq, 1), np.int64),
             (np.zeros((1, 1, 256), np.int16), np.ones(1, np.float32)), np.zeros(256, np.float32), empty, 1)
