"""Seed codes: LSQ++'s encoder (iterated local search, ILS) over fixed additive codebooks.

faiss's `LocalSearchQuantizer.compute_codes` recomputes the M x M x K x K codeword inner
products on every call: 0.1-0.2 s at d = 384, M = 8, however few vectors it encodes.  Here they
are computed once per set of codebooks, and faiss's own steps (unary terms, ICM sweeps,
errors; C++ and OpenMP) run inside the loop of faiss's encoder: random codes, then `rounds`
rounds of perturbing `nperts` codes per vector, `icm_iters` ICM sweeps, and keeping each
vector's best.  The random draws come from a hash of the vector itself, so a vector gets the
same code in any batch (faiss draws them in batch order).
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

# The binary terms' bytes a model may ask for (M² K² float32): 64 MiB at M = 16, K = 256.
MAX_BINARY_BYTES = 256 << 20
CHUNK = 4096  # vectors encoded at a time: their unary terms are CHUNK x M x K floats (32 MiB at M = 8)
SMALL = 64  # fewer vectors than this are encoded on the calling thread alone
SEED_ROUNDS = 16  # faiss's default encode_ils_iters
MAX_SEED_ROUNDS = 256  # each round costs about as much as the first: a bound, not a setting

# faiss's LSQ steps keep no state of their own, but most time themselves in one global timer
# (faiss's lsq_timer, an unguarded map): two threads in them at once would race on it.  The ICM
# sweeps (most of the work) do not touch it and run outside the lock.
_faiss_lsq = threading.Lock()


def possible(M: int, K: int) -> bool:
    """Whether a model of M steps of K codewords can have seeds: K a power of 2 (LSQ++ uses all
    2^nbits codewords), and at most MAX_BINARY_BYTES of codeword products (M <= 32 at K = 256)."""
    return K & (K - 1) == 0 and 4 * M * M * K * K <= MAX_BINARY_BYTES


def check_codebooks(shape: tuple, M: int, K: int, d: int) -> None:
    """Seed codebooks of this shape fit a model of M steps of K codewords in d dimensions, or ValueError."""
    if tuple(shape) != (M, K, d) or not possible(M, K):
        raise ValueError(f"seed codebooks must be ({M}, {K}, {d}) with K a power of 2 and M² K² x 4 bytes "
                         f"at most {MAX_BINARY_BYTES >> 20} MiB, got {tuple(shape)}")


def check_rounds(rounds) -> None:
    """Rounds of local search are an integer in [1, MAX_SEED_ROUNDS], or ValueError."""
    if type(rounds) is not int or not 1 <= rounds <= MAX_SEED_ROUNDS:
        raise ValueError(f"expected an integer 1 <= seed_rounds <= {MAX_SEED_ROUNDS}, got {rounds!r}")


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-spread uint64 (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class LocalSearch:
    """LSQ++'s encoder over codebooks (M, K, d) float32, K a power of 2 (faiss's default settings
    but the rounds, which each call chooses)."""

    def __init__(self, codebooks: np.ndarray):
        M, K, d = codebooks.shape
        check_codebooks(codebooks.shape, M, K, d)
        self.lsq = faiss.LocalSearchQuantizer(d, M, int(np.log2(K)))
        self.lsq.nperts = min(self.lsq.nperts, M)  # codes perturbed per round: at most all of them
        faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, dtype=np.float32).ravel(), self.lsq.codebooks)
        self.lsq.is_trained = True
        self.M, self.K, self.d = M, K, d
        self.binaries = np.empty(M * M * K * K, dtype=np.float32)
        with _faiss_lsq:
            self.lsq.compute_binary_terms(faiss.swig_ptr(self.binaries))

    def codes(self, x: np.ndarray, rounds: int = SEED_ROUNDS) -> np.ndarray:
        """Residuals (n, d) -> codes (n, M) int64 after `rounds` rounds of local search, each row's
        independent of the others (a row's first rounds are the same whatever `rounds` is)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected residuals of shape (n, {self.d}), got {x.shape}")
        check_rounds(rounds)
        out = np.empty((len(x), self.M), dtype=np.int64)
        threads = faiss.omp_get_max_threads()
        if len(x) < SMALL:  # one thread: faiss's parallel regions (~100 a round) would cost more than they share
            faiss.omp_set_num_threads(1)
        try:
            for i0 in range(0, len(x), CHUNK):
                out[i0:i0 + CHUNK] = self._chunk(x[i0:i0 + CHUNK], rounds)
        finally:
            faiss.omp_set_num_threads(threads)
        return out

    def _chunk(self, x: np.ndarray, rounds: int) -> np.ndarray:
        lsq, n, M, K = self.lsq, len(x), self.M, self.K
        p = lsq.nperts
        # One stream of draws per vector, keyed on its bytes: draw j of row i is mix(key_i + j).
        words = x.view(np.uint32).astype(np.uint64) ^ (np.arange(self.d, dtype=np.uint64) << np.uint64(32))
        key = _mix(np.bitwise_xor.reduce(_mix(words), axis=1))[:, None]
        draws = lambda j0, k: _mix(key + np.arange(j0, j0 + k, dtype=np.uint64))  # (n, k) uint64
        codes = (draws(0, M) % np.uint64(K)).astype(np.int32)
        unaries = np.empty((n, M, K), dtype=np.float32)
        best, best_err, err = codes.copy(), np.empty(n, np.float32), np.empty(n, np.float32)
        rows = np.arange(n)[:, None]
        with _faiss_lsq:
            lsq.compute_unary_terms(faiss.swig_ptr(x), faiss.swig_ptr(unaries), n)
            lsq.evaluate(faiss.swig_ptr(best), faiss.swig_ptr(x), n, faiss.swig_ptr(best_err))
        for it in range(rounds):
            r = draws(M + 2 * p * it, 2 * p)
            codes[rows, (r[:, :p] % np.uint64(M)).astype(np.int64)] = (r[:, p:] % np.uint64(K)).astype(np.int32)
            lsq.icm_encode_step(faiss.swig_ptr(codes), faiss.swig_ptr(unaries), faiss.swig_ptr(self.binaries),
                                n, lsq.icm_iters)
            with _faiss_lsq:
                lsq.evaluate(faiss.swig_ptr(codes), faiss.swig_ptr(x), n, faiss.swig_ptr(err))
            better = err < best_err
            best[better], best_err[better] = codes[better], err[better]
            codes[:] = best
        return best
