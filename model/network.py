"""The QINCo network: residual quantization with implicit neural codebooks.

Shapes: n vectors of dimension d, M code steps of K codewords each, beams B,
pre-selected candidates A.  Everything inside the module works on
*normalised* vectors; `encode`/`decode` take and return raw vectors.

Step m >= 2 (or every step of the IVF variant) turns a base codeword c and the
reconstruction so far x̂ into a codeword:

    z = e + Linear([e ; P x̂])          e = P c   (P: optional d -> de projection)
    z = z + W2 ReLU(W1 z)              L residual blocks, no bias
    codeword = z                       (de == d)
    codeword = c + Q z                 (de != d, Q: de -> d)

The concatenation Linear(2de -> de) is stored as its two halves so that the
codeword half, which does not depend on the vector, is computed once per step
for all K codewords (QINCo2).  Output layers start at zero, so an untrained
model is exactly the residual quantizer its codebooks were copied from.

The modules (`QincoStep.candidates`, `Qinco.forward`) are what training differentiates and
the reference for everything else.  `encode`, `decode` and `Qinco.encode_normalized` run a
fast path on weights extracted once per model (`fast_steps`, rebuilt when a weight changes):
vector-independent tables per codeword, one product per beam instead of per candidate for
the first layer, cache-sized encoding chunks on single-threaded workers, and a numpy
decoder for re-ranking shortlists (no per-module dispatch).  Tests hold both to the reference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import nn

from .seeds import SEED_ROUNDS, LocalSearch, check_codebooks, check_rounds
from .threads import numpy_blas_one_thread, own_torch_threads


@dataclass(frozen=True)
class QincoConfig:
    d: int  # vector dimension
    M: int  # QINCo steps (bytes per vector when K = 256, plus the list id for IVF)
    K: int = 256  # codewords per step
    L: int = 2  # residual blocks per step
    h: int = 256  # hidden width of the residual blocks
    de: int = 0  # embedding width of the blocks (0: work in d)
    rank: int = 0  # low-rank concatenation width, QINCo-LR (0: full Linear(2de -> de))
    nlist: int = 0  # IVF lists: step 0 is a frozen centroid table (0: no IVF)

    def __post_init__(self):
        for name in ("d", "M", "K"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("L", "h", "de", "rank", "nlist"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def nbits(self) -> int:
        return math.ceil(math.log2(self.K))

    @property
    def code_bytes(self) -> int:
        """Bytes of the QINCo codes (the IVF list number is stored apart)."""
        return math.ceil(self.M * self.nbits / 8)

    @property
    def decode_macs(self) -> int:
        """Multiply-adds to decode one vector with the fast decoder (the first-layer fold applied)."""
        de = self.de or self.d
        per_step = self.d * de + 2 * self.L * de * self.h + (de * self.d if de != self.d else 0)
        return self.M * per_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QincoConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QINCo config keys: {sorted(unknown)}")
        return cls(**data)


HIGH_D, HIGH_D_WIDTH = 256, 128


def default_de(d: int) -> int:
    """The blocks' width for d-dimensional data: HIGH_D_WIDTH from d = HIGH_D on (QINCo2's de),
    else d (0).  At d = 384 a step then costs ~2.5x less, so a training minute sees more vectors
    and ends lower (bench/RESULTS.md "Session 10")."""
    return HIGH_D_WIDTH if d >= HIGH_D else 0


@dataclass(frozen=True)
class Encoder:
    """Encoding search: pre-select the A best base codewords, keep B beams; `seeded`: then keep
    the model's seed code instead where the network decodes it closer (`Qinco.seed_codes`, found
    in `seed_rounds` rounds of local search)."""

    A: int = 32
    B: int = 1
    seeded: bool = True
    seed_rounds: int = SEED_ROUNDS

    def __post_init__(self):
        if self.A < 1 or self.B < 1:
            raise ValueError(f"encoder needs A >= 1 and B >= 1, got A={self.A} B={self.B}")
        check_rounds(self.seed_rounds)


# Named settings used by the CLI, the benchmark and the service.  For the same
# number of network evaluations per step (A x B), few candidates and many beams
# win: A=4, B=16 beats A=16, B=4 clearly, at the same cost (bench/RESULTS.md).
# `quality` is the setting of the published 8-byte figures; A=8, B=32 comes within
# about 1% of its MSE at a quarter of the cost.
ENCODERS = {
    "greedy": Encoder(A=1 << 30, B=1),  # the reference: all K codewords, one beam
    # fast ingest's acknowledgement (codes re-encoded later) skips the seed's local search: it
    # would cost about as much again
    "fast": Encoder(A=4, B=4, seeded=False),  # 16 network evaluations per step, greedy's 256
    "balanced": Encoder(A=4, B=16),  # 64 per step; the default of the index and the service
    # 1024 per step: the lowest MSE.  Its seeds search 32 rounds, as LSQ++'s best faiss row
    # does: 0.3% lower MSE on wordnet for ~7% more of `balanced`'s time, <1% of this one's
    "quality": Encoder(A=32, B=32, seed_rounds=32),
}


def parse_encoder(name: str) -> Encoder:
    """A name from ENCODERS, "AxB" (such as 64x16) or "AxBxR" (R seed rounds) -> Encoder, or ValueError."""
    if name in ENCODERS:
        return ENCODERS[name]
    numbers = re.fullmatch(r"([0-9]{1,9})x([0-9]{1,9})(?:x([0-9]{1,9}))?", name)
    if numbers is None:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, AxB or AxBxR, got {name!r}")
    A, B, rounds = numbers.groups()
    return Encoder(A=int(A), B=int(B), seed_rounds=int(rounds) if rounds else SEED_ROUNDS)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.down(torch.relu(self.up(z)))


class PlainStep(nn.Module):
    """First step of a non-IVF model: an ordinary codebook."""

    def __init__(self, cfg: QincoConfig):
        super().__init__()
        self.codebook = nn.Parameter(torch.zeros(cfg.K, cfg.d))

    def candidates(self, idx: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        """idx (n, B, A) codeword ids, xhat (n, B, d) -> codewords (n, B, A, d)."""
        return self.codebook[idx]


class QincoStep(nn.Module):
    """A step whose codebook is a function of the reconstruction so far."""

    def __init__(self, cfg: QincoConfig):
        super().__init__()
        d, de = cfg.d, cfg.de or cfg.d
        width = cfg.rank or de
        self.codebook = nn.Parameter(torch.zeros(cfg.K, d))
        self.project_in = nn.Linear(d, de, bias=False) if de != d else None
        self.project_out = nn.Linear(de, d, bias=False) if de != d else None
        # The two halves of Linear([e ; P x̂]) (then Linear(rank -> de) for QINCo-LR).
        self.concat_codeword = nn.Linear(de, width, bias=False)
        self.concat_context = nn.Linear(de, width, bias=cfg.rank == 0)
        self.concat_up = nn.Linear(width, de) if cfg.rank else None
        self.blocks = nn.Sequential(*[ResidualBlock(de, cfg.h) for _ in range(cfg.L)])
        if self.project_out is not None:
            zero_init = [self.project_out]
        elif self.concat_up is not None:
            zero_init = [self.concat_up]
        else:
            zero_init = [self.concat_codeword, self.concat_context]
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def _embed(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.project_in is None else self.project_in(v)

    def codeword_half(self) -> torch.Tensor:
        """(K, de) or (K, rank): the vector-independent part, once per step."""
        return self.concat_codeword(self._embed(self.codebook))

    def candidates(self, idx: torch.Tensor, xhat: torch.Tensor, codeword_half=None) -> torch.Tensor:
        """idx (n, B, A) codeword ids, xhat (n, B, d) -> codewords (n, B, A, d).

        codeword_half: `codeword_half()`, when the caller reuses it; without it, fewer
        than K codewords get their half computed alone (a 20-row re-ranking decode
        need not pay for all K rows), more than K from the whole table.
        """
        c = self.codebook[idx]  # (n, B, A, d)
        e = c if self.project_in is None else self.project_in(c)
        if codeword_half is not None:
            half = codeword_half[idx]
        else:
            half = self.concat_codeword(e) if idx.numel() < self.codebook.shape[0] else self.codeword_half()[idx]
        mix = half + self.concat_context(self._embed(xhat)).unsqueeze(2)
        if self.concat_up is not None:
            mix = self.concat_up(mix)
        z = self.blocks(e + mix)
        return z if self.project_out is None else c + self.project_out(z)


class Qinco(nn.Module):
    """The whole quantizer: normalisation, optional IVF step, M QINCo steps."""

    def __init__(self, cfg: QincoConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.d))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("centroids", torch.zeros(cfg.nlist, cfg.d))  # normalised space
        if cfg.nlist:
            # The IVF index's approximate decoder (model/codebooks.py): raw-space tables
            # fitted to this model's codes, and the range of the norms it stores.
            self.register_buffer("tables", torch.zeros(cfg.M, cfg.K, cfg.d))
            self.register_buffer("norm_range", torch.zeros(2))
        # The additive codebooks of the seed codes (LSQ++'s, when training started from them),
        # normalised residual space: (M, K, d), or (0, K, d) for a model without seeds.
        self.register_buffer("seed_codebooks", torch.zeros(0, cfg.K, cfg.d))
        first = QincoStep if cfg.nlist else PlainStep
        self.steps = nn.ModuleList([first(cfg)] + [QincoStep(cfg) for _ in range(cfg.M - 1)])
        self._coarse = None  # faiss index over the centroids, built on first use
        self._seeder = None  # (key, LSQ++'s encoder over seed_codebooks), built on first use

    # ---- normalisation -------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.mean

    # ---- IVF ---------------------------------------------------------------------------
    def coarse_index(self) -> faiss.Index:
        """Exact search over few centroids, HNSW over many (no dense nq x nlist matrix)."""
        if self._coarse is None:
            cfg = self.cfg
            if cfg.nlist <= 16384:
                index = faiss.IndexFlatL2(cfg.d)
            else:
                index = faiss.IndexHNSWFlat(cfg.d, 32)
                index.hnsw.efConstruction = 80
                index.hnsw.efSearch = 128
            index.add(self.centroids.float().cpu().numpy())
            self._coarse = index
        return self._coarse

    def set_centroids(self, centroids: torch.Tensor):
        self.centroids.copy_(centroids)
        self._coarse = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._coarse = self._seeder = None
        self.invalidate_fast()
        seeds = state_dict.get(prefix + "seed_codebooks")
        if seeds is not None and tuple(seeds.shape) != tuple(self.seed_codebooks.shape):
            cfg = self.cfg
            if tuple(seeds.shape) != (0, cfg.K, cfg.d):  # no seeds, or the model's: ValueError otherwise
                check_codebooks(seeds.shape, cfg.M, cfg.K, cfg.d)
            self.seed_codebooks = self.seed_codebooks.new_zeros(seeds.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):  # copies and pickles carry the weights, not the extracted ones
        state = dict(super().__getstate__())
        state.pop("_fast", None)
        state.pop("_fast_tensors", None)
        state["_seeder"] = None  # rebuilt on first use (it holds a faiss object)
        return state

    def invalidate_fast(self):
        """Drop the fast path's extracted weights.  In-place changes (optimizer steps, copy_)
        are detected by themselves; call this after *replacing* a parameter or buffer object."""
        self.__dict__.pop("_fast", None)
        self.__dict__.pop("_fast_tensors", None)

    def centroids_raw(self) -> np.ndarray:
        return self.denormalize(self.centroids).detach().numpy()

    def assign(self, xn: torch.Tensor) -> torch.Tensor:
        """Nearest centroid of normalised vectors: (n, d) -> (n,) int64."""
        _, lists = self.coarse_index().search(np.ascontiguousarray(xn.float().cpu().numpy()), 1)
        return torch.from_numpy(lists[:, 0]).long()

    # ---- seed codes -----------------------------------------------------------------
    def set_seed_codebooks(self, codebooks: np.ndarray | None) -> None:
        """Codebooks (M, K, d) of an additive quantizer in normalised residual space, whose
        local-search codes every seeded encoder also tries; None: no seeds."""
        cfg = self.cfg
        if codebooks is None:
            self.seed_codebooks = self.seed_codebooks.new_zeros(0, cfg.K, cfg.d)
        else:
            check_codebooks(codebooks.shape, cfg.M, cfg.K, cfg.d)
            self.seed_codebooks = torch.from_numpy(np.ascontiguousarray(codebooks, dtype=np.float32)).to(
                self.seed_codebooks.device)
        self._seeder = None

    def seed_codes(self, xn: torch.Tensor, lists: torch.Tensor | None = None,
                   rounds: int = SEED_ROUNDS) -> torch.Tensor | None:
        """Codes (n, M) int64 of normalised vectors by LSQ++'s local search (model/seeds.py, faiss's
        default encoding settings but `rounds`) over the seed codebooks, on the residuals from the
        vectors' start (the IVF centroid); None for a model without seeds.

        At step 0 the network adds nothing, so these are exactly LSQ++'s codes when training
        started from its codebooks: a beam search over the same codebooks ends several % worse
        (bench/RESULTS.md).  Later the network decodes them as any code, and a seeded encoder
        keeps whichever of them and its beam search's result reconstructs better."""
        seeder = self.seeder()
        if seeder is None:
            return None
        r = (xn - self.start(lists, len(xn))).detach().float().cpu().numpy()
        return torch.from_numpy(seeder.codes(r, rounds)).to(xn.device)

    def seeder(self) -> LocalSearch | None:
        """LSQ++'s encoder over the seed codebooks (None without them), built on first use: its
        M² K² codeword products take a moment, so a swap builds it before it holds any lock."""
        books = self.seed_codebooks
        if not len(books):
            return None
        try:
            key = (books.data_ptr(), books._version)  # an in-place change rebuilds it
        except RuntimeError:  # an inference tensor: no version counter, and no in-place change either
            key = (books.data_ptr(), None)
        cached = self._seeder
        if cached is not None and cached[0] == key:
            return cached[1]
        with _seeder_build:  # one build however many threads ask at once
            if self._seeder is None or self._seeder[0] != key:
                self._seeder = (key, LocalSearch(books.detach().float().cpu().numpy()))
            return self._seeder[1]

    # ---- decoding ------------------------------------------------------------------
    def start(self, lists: torch.Tensor | None, n: int) -> torch.Tensor:
        """The reconstruction before step 1: the centroid, or zero."""
        if self.cfg.nlist:
            return self.centroids[lists]
        return self.centroids.new_zeros(n, self.cfg.d)

    def forward(self, codes: torch.Tensor, lists: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised reconstructions after every step: codes (n, m) -> (m, n, d)."""
        xhat = self.start(lists, codes.shape[0])
        out = []
        for m in range(codes.shape[1]):
            idx = codes[:, m].view(-1, 1, 1)
            xhat = xhat + self.steps[m].candidates(idx, xhat.unsqueeze(1))[:, 0, 0]
            out.append(xhat)
        return torch.stack(out)

    def decode_normalized(self, codes: torch.Tensor, lists: torch.Tensor | None = None) -> torch.Tensor:
        if codes.shape[1] == 0:
            return self.start(lists, codes.shape[0])
        return self.forward(codes, lists)[-1]

    # ---- encoding ------------------------------------------------------------------
    def encode_normalized(self, xn: torch.Tensor, encoder: Encoder, lists: torch.Tensor | None = None,
                          chunk: int = 0, seeds: torch.Tensor | None = None):
        """Beam search with candidate pre-selection, then the seed code where it is better.

        xn (n, d) normalised vectors -> codes (n, M) int64 and their reconstruction (n, d).
        seeds: the vectors' `seed_codes` when the caller has them (training computes them once),
        found with the encoder's `seed_rounds`: they are used as given.
        The fast path (`FastSteps.encode`): under torch.autocast (training) the network runs in
        the autocast dtype, the candidate errors always in float32.
        """
        if encoder.seeded and seeds is None:
            seeds = self.seed_codes(xn, lists, encoder.seed_rounds)
        if xn.device.type != "cpu":  # the fast path is numpy; the reference runs on any device
            return self.encode_normalized_reference(xn, encoder, lists, seeds=seeds)
        dtype = None
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            fast = fast_steps(self, dtype)
            return fast.encode(xn, encoder, self.start(lists, xn.shape[0]), chunk=chunk,
                               seeds=seeds if encoder.seeded else None)

    def encode_normalized_reference(self, xn: torch.Tensor, encoder: Encoder, lists: torch.Tensor | None = None,
                                    profile: dict | None = None, seeds: torch.Tensor | None = None):
        """The original module-by-module beam search, kept as the reference of the fast path
        (tests and bench/throughput.py compare them); same arguments and results.  `profile`:
        seconds added per part, as `FastSteps.encode` does."""
        if encoder.seeded and seeds is None:
            seeds = self.seed_codes(xn, lists, encoder.seed_rounds)
        n, K = xn.shape[0], self.cfg.K
        A = min(encoder.A, K)
        xhat = self.start(lists, n).unsqueeze(1)  # (n, 1, d)
        codes = torch.zeros(n, 1, 0, dtype=torch.long, device=xn.device)
        for step in self.steps:
            t0 = time.perf_counter()
            beams = xhat.shape[1]
            residual = (xn.unsqueeze(1) - xhat).float()  # (n, beams, d)
            if A < K:  # cheap score against the base codebook
                cb = step.codebook
                score = (cb * cb).sum(-1) - 2 * residual @ cb.T  # (n, beams, K)
                cand = score.topk(A, dim=-1, largest=False).indices
            else:
                cand = torch.arange(K, device=xn.device).expand(n, beams, K)
            t1 = time.perf_counter()
            half = step.codeword_half() if isinstance(step, QincoStep) else None
            cw = step.candidates(cand, xhat) if half is None else step.candidates(cand, xhat, half)
            cw = cw.float()  # rank candidates in float32 even when the network ran in bf16
            t2 = time.perf_counter()
            err = (residual.unsqueeze(2) - cw).square().sum(-1).reshape(n, beams * A)
            best = err.topk(min(encoder.B, beams * A), dim=-1, largest=False).indices  # sorted
            parent = best // A
            chosen = cand.reshape(n, beams * A).gather(1, best)
            xhat = xhat.gather(1, parent.unsqueeze(-1).expand(-1, -1, xn.shape[1]))
            xhat = xhat + cw.reshape(n, beams * A, -1).gather(1, best.unsqueeze(-1).expand(-1, -1, xn.shape[1]))
            codes = torch.cat([codes.gather(1, parent.unsqueeze(-1).expand(-1, -1, codes.shape[2])),
                               chosen.unsqueeze(-1)], dim=2)
            if profile is not None:
                for part, dt in (("pre-selection", t1 - t0), ("network", t2 - t1),
                                 ("beam bookkeeping", time.perf_counter() - t2)):
                    profile[part] = profile.get(part, 0.0) + dt
        codes, xhat = codes[:, 0], xhat[:, 0]
        if encoder.seeded and seeds is not None:
            return keep_better(xn, codes, xhat, seeds, self.decode_normalized(seeds, lists).to(xhat.dtype))
        return codes, xhat


# ---- the fast path: weights extracted once, no per-module dispatch ---------------------

# Bytes of first-layer activations (candidate rows x (de + h) floats) per encoding chunk: about
# 5 MB ran fastest at d=50 (4,096 rows) and at d=384 (2,048 rows; 4,096 rows ran 2x slower).
ENCODE_BYTES = 5 << 20


class FastStep:
    """One step's weights as plain contiguous tensors, the vector-independent parts precomputed.

    The first layer of a QINCo step is linear in the codeword and in x̂ apart, so

        z0 = T0[i] + x̂ Wg^T              T0 = e + Linear_codeword(e) (+ biases), per codeword
        W1 z0 = (T0 W1^T)[i] + x̂ (Wg^T W1^T)

    A table look-up and one product per *beam* replace the codeword half and the first
    up-projection per *candidate* in the encoder.  Plain (non-IVF first) steps are codebooks.
    """

    def __init__(self, step: nn.Module, dtype: torch.dtype):
        cb = step.codebook.detach().float()
        self.cb = cb.contiguous()  # (K, d) float32
        self.cbT = cb.T.contiguous()  # (d, K)
        self.cb_sq = (cb * cb).sum(-1)  # (K,)
        self.cb_np = self.cb.numpy()
        self.plain = not isinstance(step, QincoStep)
        if self.plain:
            return
        d = cb.shape[1]
        P = step.project_in.weight.detach().float() if step.project_in is not None else torch.eye(d)
        e = cb @ P.T  # (K, de)
        half = e @ step.concat_codeword.weight.detach().float().T  # (K, width)
        Wc = step.concat_context.weight.detach().float() @ P  # (width, d)
        if step.concat_context.bias is not None:
            half = half + step.concat_context.bias.detach().float()
        if step.concat_up is not None:
            U = step.concat_up.weight.detach().float()
            half = half @ U.T + step.concat_up.bias.detach().float()
            Wc = U @ Wc
        T0, WgT = e + half, Wc.T  # (K, de), (d, de)
        self.blocks = [(b.up.weight.detach().float().T.contiguous(), b.down.weight.detach().float().T.contiguous())
                       for b in step.blocks]
        self.QT = step.project_out.weight.detach().float().T.contiguous() if step.project_out is not None else None
        # float32 copies for the decoder (the reference is float32), `dtype` ones for the encoder.
        self.T0, self.WgT = T0.contiguous(), WgT.contiguous()
        # numpy views of the same memory for the small-batch decoder (numpy calls cost ~1 µs)
        self.np = (self.T0.numpy(), self.WgT.numpy(), [(a.numpy(), b.numpy()) for a, b in self.blocks],
                   None if self.QT is None else self.QT.numpy())
        if self.blocks:
            W1T = self.blocks[0][0]
            T0, WgT = torch.cat([T0, T0 @ W1T], 1), torch.cat([WgT, WgT @ W1T], 1)
        self.de = self.T0.shape[1]
        self.dtype = dtype
        self.Tcat, self.WxT = T0.to(dtype).contiguous(), WgT.to(dtype).contiguous()  # (K, de [+ h]), (d, de [+ h])
        self.blocks_x = [(W1T.to(dtype), W2T.to(dtype)) for W1T, W2T in self.blocks]
        self.QT_x = None if self.QT is None else self.QT.to(dtype)
        self.cb_x = self.cb.to(dtype)

    def codewords(self, idx: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        """Decoder: idx (n,) and xhat (n, d) float32 -> codewords (n, d) float32."""
        if self.plain:
            return self.cb.index_select(0, idx)
        z = torch.addmm(self.T0.index_select(0, idx), xhat, self.WgT)
        for W1T, W2T in self.blocks:
            z = torch.addmm(z, (z @ W1T).relu_(), W2T)
        return z if self.QT is None else torch.addmm(self.cb.index_select(0, idx), z, self.QT)

    def codewords_np(self, idx: np.ndarray, xhat: np.ndarray) -> np.ndarray:
        """`codewords` in numpy, for a handful of rows: idx (n,) int64, xhat (n, d) float32."""
        if self.plain:
            return self.cb_np[idx]
        T0, WgT, blocks, QT = self.np
        z = T0[idx]
        z += xhat @ WgT
        for W1T, W2T in blocks:
            a = z @ W1T
            np.maximum(a, 0, out=a)
            z += a @ W2T
        if QT is None:
            return z
        cw = z @ QT
        cw += self.cb_np[idx]
        return cw

    def candidates(self, cand: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        """Encoder: cand (nb, A) codeword ids for nb beams xhat (nb, d) -> codewords (nb * A, d) float32."""
        flat = cand.reshape(-1)
        if self.plain:
            return self.cb.index_select(0, flat)
        nb, A = cand.shape
        g = xhat.to(self.dtype) @ self.WxT  # (nb, de [+ h]): once per beam
        y = self.Tcat.index_select(0, flat).view(nb, A, -1)
        y += g.unsqueeze(1)
        y = y.view(nb * A, -1)
        if self.blocks_x:
            de = self.de
            W1T, W2T = self.blocks_x[0]
            z = torch.addmm(y[:, :de], y[:, de:].relu_(), W2T)
            for W1T, W2T in self.blocks_x[1:]:
                z = torch.addmm(z, (z @ W1T).relu_(), W2T)
        else:
            z = y
        if self.QT_x is not None:
            z = torch.addmm(self.cb_x.index_select(0, flat), z, self.QT_x)
        return z.float()


class FastSteps:
    """All steps of a model in fast form (`fast_steps` caches one per model and dtype)."""

    def __init__(self, model: "Qinco", dtype: torch.dtype = torch.float32):
        with torch.no_grad():
            self.steps = [FastStep(s, dtype) for s in model.steps]
            self.centroids = model.centroids.detach().float().contiguous()
            self.mean = model.mean.detach().float().numpy().copy()
            self.scale = np.float32(model.scale)
        self.K, self.d = model.cfg.K, model.cfg.d
        self.dtype = dtype

    def decode_small(self, codes: np.ndarray, lists: np.ndarray | None) -> np.ndarray:
        """Raw vectors (n, d) of a few codes (n, m) int64 (and their IVF lists), all in numpy:
        no torch dispatch, so a 20-row shortlist costs about its matrix products."""
        if lists is None:
            x = np.zeros((len(codes), self.d), dtype=np.float32)
        else:
            x = self.centroids.numpy()[lists]
        for step, idx in zip(self.steps, codes.T):
            x += step.codewords_np(idx, x)
        x *= self.scale
        x += self.mean
        return x

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        """codes (n, m) int64, start xhat (n, d) -> normalised reconstructions (n, d) float32."""
        x = xhat.float().clone()
        for step, idx in zip(self.steps, codes.T.contiguous()):
            x += step.codewords(idx, x)
        return x

    @torch.no_grad()
    def encode(self, xn: torch.Tensor, encoder: Encoder, start: torch.Tensor, chunk: int = 0,
               profile: dict | None = None, seeds: torch.Tensor | None = None):
        """Beam search: xn (n, d) normalised, start (n, d) -> codes (n, M) int64, xhat (n, d) float32.

        Vectors go through in chunks of about ENCODE_BYTES of activations, so that they
        stay in cache.  `profile` (a dict) accumulates seconds per part.  seeds (n, M): codes
        kept instead of the search's where they reconstruct better (`Qinco.seed_codes`).
        """
        xn, start = xn.float(), start.float()
        n, d = xn.shape
        A = min(encoder.A, self.K)
        width = max([s.Tcat.shape[1] for s in self.steps if not s.plain], default=d)
        chunk = chunk or max(1, ENCODE_BYTES // (4 * width * A * encoder.B))
        codes = torch.empty(n, len(self.steps), dtype=torch.long)
        xhat = torch.empty(n, d)
        for i0 in range(0, n, chunk):
            sl = slice(i0, i0 + chunk)
            codes[sl], xhat[sl] = self._encode_chunk(xn[sl], start[sl], A, encoder.B, profile)
        if seeds is not None:
            return keep_better(xn, codes, xhat, seeds, self.decode(seeds, start))
        return codes, xhat

    def _encode_chunk(self, x, xhat, A, B, profile):
        n, d = x.shape
        K = self.K
        xhat = xhat.view(n, 1, d)
        codes = torch.zeros(n, 1, 0, dtype=torch.long)
        clock = time.perf_counter if profile is not None else None
        for step in self.steps:
            t0 = clock() if clock else 0.0
            beams = xhat.shape[1]
            r = x.unsqueeze(1) - xhat  # (n, beams, d)
            if A < K:  # pre-selection against the base codebook: ||c||² - 2 <r, c>
                score = torch.addmm(step.cb_sq, r.view(-1, d), step.cbT, alpha=-2)
                cand = score.topk(A, dim=1, largest=False, sorted=False).indices  # (n * beams, A)
            else:
                cand = torch.arange(K).expand(n * beams, K)
            t1 = clock() if clock else 0.0
            cw = step.candidates(cand, xhat.view(-1, d))  # (n * beams * A, d)
            t2 = clock() if clock else 0.0
            err = (r.view(n * beams, 1, d) - cw.view(n * beams, A, d)).square_().sum(-1).view(n, beams * A)
            nb = min(B, beams * A)
            best = err.topk(nb, dim=1, largest=False).indices  # (n, nb), sorted
            rows = (best + (torch.arange(n) * (beams * A)).unsqueeze(1)).view(-1)
            parents = rows.div(A, rounding_mode="floor")
            xhat = (xhat.view(-1, d).index_select(0, parents) + cw.index_select(0, rows)).view(n, nb, d)
            chosen = cand.reshape(-1).index_select(0, rows).view(n, nb, 1)
            codes = torch.cat([codes.view(n * beams, -1).index_select(0, parents).view(n, nb, -1), chosen], 2)
            if clock:
                t3 = clock()
                for part, dt in (("pre-selection", t1 - t0), ("network", t2 - t1), ("beam bookkeeping", t3 - t2)):
                    profile[part] = profile.get(part, 0.0) + dt
        return codes[:, 0], xhat[:, 0]


def keep_better(xn: torch.Tensor, codes: torch.Tensor, xhat: torch.Tensor, seeds: torch.Tensor,
                seeded_xhat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per vector, the seed code (n, M) and its reconstruction where it is closer to xn (n, d)
    than the search's; ties keep the search's."""
    better = (xn - seeded_xhat).square().sum(-1) < (xn - xhat).square().sum(-1)
    return torch.where(better[:, None], seeds, codes), torch.where(better[:, None], seeded_xhat, xhat)


_seeder_build = threading.Lock()


def _weights_key(model: "Qinco"):
    """Changes whenever a weight is modified in place (optimizer steps, load_state_dict, copy_).

    The tensors are listed once per model (walking the module tree costs ~100 µs, more than
    a 20-row decode should); `_load_from_state_dict` and `invalidate_fast` drop the list.
    """
    tensors = model.__dict__.get("_fast_tensors")
    if tensors is None:
        tensors = list(model.steps.parameters()) + [model.mean, model.scale, model.centroids]
        model._fast_tensors = tensors
    try:
        return tuple([t._version for t in tensors])
    except RuntimeError:  # inference tensors keep no version counter: no caching
        return None


def fast_steps(model: "Qinco", dtype: torch.dtype | None = None) -> FastSteps:
    """The model's FastSteps for `dtype` (float32 by default).

    Cached only in eval mode, keyed on the weights' version counters (in-place updates,
    `load_state_dict`); in training mode it is rebuilt on every call (a fused optimizer or
    a write through `.data` leaves no trace in the counters), which costs ~K x d x h
    multiply-adds per step, little beside a training batch's search.  Safe for concurrent
    readers: a FastSteps is never modified once built, and the cache is replaced, never
    updated in place (two threads may both build it once; same result).
    """
    dtype = dtype or torch.float32
    if model.training:
        return FastSteps(model, dtype)
    key = _weights_key(model)
    cache = getattr(model, "_fast", {})
    hit = cache.get(dtype)
    if hit is not None and key is not None and hit[0] == key:
        return hit[1]
    fast = FastSteps(model, dtype)
    if key is not None:
        model._fast = {**cache, dtype: (key, fast)}
    return fast


# ---- numpy entry points: raw vectors in, raw vectors out ------------------------------

def check_vectors(x, d: int, what: str = "vectors") -> np.ndarray:
    """Validate a batch of raw vectors; returns it as contiguous float32 (n, d)."""
    x = np.asarray(x)
    if x.ndim == 1 and x.size == d:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, {d}), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty: need at least one vector")
    if x.shape[1] != d:
        raise ValueError(f"expected dim {d}, got {x.shape[1]}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{what} must be real numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not x.flags.writeable:  # a memory-mapped file: torch wants its own copy
        x = x.copy()
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or Inf")
    return x


def code_dtype(cfg: QincoConfig):
    return np.uint8 if cfg.K <= 256 and cfg.nlist == 0 else np.int32


def code_width(cfg: QincoConfig) -> int:
    """Columns of a code array: the IVF list first (IVF models), then M codes."""
    return cfg.M + (1 if cfg.nlist else 0)


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, n): a forked child makes its own
_pool_lock = threading.Lock()


def _single_thread_pool(n: int) -> ThreadPoolExecutor:
    """n worker threads whose torch ops each run on one thread (one pool per n, kept).

    Small encoding chunks spend much of their time in OpenMP barriers when every op is
    split across the cores (and far more when the CPU is shared); independent chunks on
    single-threaded workers do not wait for each other.
    """
    key = (os.getpid(), n)
    with _pool_lock:
        pool = _pools.get(key)
        if pool is None:
            barrier = threading.Barrier(n)

            def init():
                own_torch_threads(1)
                barrier.wait()  # n threads: none is idle until all have started

            pool = ThreadPoolExecutor(n, thread_name_prefix="qinco-encode", initializer=init)
            for f in [pool.submit(lambda: None) for _ in range(n)]:
                f.result()
            _pools[key] = pool
        return pool


def encode(model: Qinco, x, encoder: Encoder = ENCODERS["quality"], batch_size: int = 1024,
           progress=None, workers: int = 0, dtype: torch.dtype | None = None,
           device: torch.device | str = "cpu") -> np.ndarray:
    """Raw vectors (n, d) -> codes (n, M) uint8, or (n, M+1) int32 with the IVF list first.

    workers: single-threaded encoding threads (default: the caller's torch thread count);
    1 runs in the calling thread with torch's own threading.
    dtype: the network's dtype in the beam search (default float32; candidate errors are
    float32 either way).  bfloat16 pays only where the CPU multiplies it in hardware
    (`model.scan.native_bf16()`): emulated, it ran 8x slower here, and it raised the MSE by
    about 1e-4 (relative) on the demo model (bench/RESULTS.md).
    device: a GPU runs the reference search on a copy of the model, in bf16 autocast.
    """
    cfg = model.cfg
    x = check_vectors(x, cfg.d)
    device = torch.device(device)
    search = _device_search(model, encoder, device) if device.type != "cpu" else \
        _cpu_search(model, encoder, workers or torch.get_num_threads(), dtype)
    out = np.empty((len(x), code_width(cfg)), dtype=code_dtype(cfg))
    for i0 in range(0, len(x), batch_size):
        with torch.inference_mode():
            xn = model.normalize(torch.from_numpy(x[i0:i0 + batch_size]))
            lists = model.assign(xn) if cfg.nlist else None  # in faiss, on the CPU
            # faiss too, on all threads
            seeds = model.seed_codes(xn, lists, encoder.seed_rounds) if encoder.seeded else None
        codes = search(xn, lists, seeds)
        if cfg.nlist:
            codes = torch.cat([lists[:, None], codes], 1)
        out[i0:i0 + len(codes)] = codes.numpy()
        if progress is not None:
            progress.update(len(codes))
    return out


def _cpu_search(model: Qinco, encoder: Encoder, workers: int, dtype: torch.dtype | None):
    """(xn, lists) -> codes by the fast path, split over single-threaded workers."""
    fast = fast_steps(model, dtype)

    @torch.inference_mode()
    def run(xn, start, seeds):
        return fast.encode(xn, encoder, start, seeds=seeds)[0]

    def search(xn, lists, seeds):
        with torch.inference_mode():
            start = model.start(lists, len(xn))
        parts = min(workers, len(xn) // 16)  # 16 vectors at least per worker
        if parts <= 1:
            return run(xn, start, seeds)
        bounds = np.linspace(0, len(xn), parts + 1).astype(int)
        jobs = [(xn[a:b], start[a:b], None if seeds is None else seeds[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(list(_single_thread_pool(workers).map(lambda job: run(*job), jobs)))
    return search


def _device_search(model: Qinco, encoder: Encoder, device: torch.device):
    """(xn, lists) -> codes on an accelerator: the reference search on a copy of the model, in bf16 autocast."""
    on_device = copy.deepcopy(model).to(device).eval()

    @torch.inference_mode()
    def search(xn, lists, seeds):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            codes, _ = on_device.encode_normalized(xn.to(device), encoder, None if lists is None else lists.to(device),
                                                   seeds=None if seeds is None else seeds.to(device))
        return codes.cpu()
    return search


def split_codes_np(model: Qinco, codes) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate a code array (in numpy: microseconds on a shortlist); returns
    (codes (n, m) int64, lists (n,) int64 or None)."""
    cfg = model.cfg
    codes = np.asarray(codes)
    lead = 1 if cfg.nlist else 0
    if codes.ndim != 2 or not 1 - lead <= codes.shape[1] - lead <= cfg.M:
        want = f"(n, 1 + m) with 0 <= m <= {cfg.M}" if lead else f"(n, m) with 1 <= m <= {cfg.M}"
        raise ValueError(f"codes must have shape {want}, got {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    codes = codes.astype(np.int64)
    qcodes = codes[:, lead:]
    if qcodes.size and (qcodes.min() < 0 or qcodes.max() >= cfg.K):
        raise ValueError(f"codes must lie in [0, {cfg.K})")
    lists = None
    if lead:
        lists = codes[:, 0]
        if codes.size and (lists.min() < 0 or lists.max() >= cfg.nlist):
            raise ValueError(f"IVF list numbers must lie in [0, {cfg.nlist})")
    return qcodes, lists


def split_codes(model: Qinco, codes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a code array; returns (codes (n, m) int64, lists (n,) or None) as tensors."""
    qcodes, lists = split_codes_np(model, codes)
    return torch.from_numpy(qcodes), None if lists is None else torch.from_numpy(lists)


SMALL_DECODE = 64  # rows up to which `decode` runs in numpy (re-ranking shortlists, single points)
def decode(model: Qinco, codes, batch_size: int = 1024) -> np.ndarray:
    """Codes (n, [1 +] m) -> raw vectors (n, d) float32.

    m < M decodes a prefix: any prefix of a QINCo code is a valid lower-rate code.
    Small batches keep the (batch, h) activations in cache: 8192 rows ran 1.5-2x slower.
    Up to SMALL_DECODE rows run in numpy on one thread (no per-op torch dispatch); both
    paths use the weights extracted by `fast_steps` and equal `Qinco.decode_normalized`
    (the module-by-module reference) to float32 rounding.
    """
    codes, lists = split_codes_np(model, codes)
    fast = fast_steps(model)
    if len(codes) <= SMALL_DECODE:
        numpy_blas_one_thread()
        return fast.decode_small(codes, lists)
    codes, lists = torch.from_numpy(codes), None if lists is None else torch.from_numpy(lists)
    out = np.empty((len(codes), model.cfg.d), dtype=np.float32)
    with torch.inference_mode():
        for i0 in range(0, len(codes), batch_size):
            sl = slice(i0, i0 + batch_size)
            part = codes[sl]
            xn = fast.decode(part, model.start(None if lists is None else lists[sl], len(part)))
            out[sl] = model.denormalize(xn).numpy()
    return out
