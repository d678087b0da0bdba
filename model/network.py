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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import nn


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QincoConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QINCo config keys: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Encoder:
    """Encoding search: pre-select the A best base codewords, keep B beams."""

    A: int = 32
    B: int = 1

    def __post_init__(self):
        if self.A < 1 or self.B < 1:
            raise ValueError(f"encoder needs A >= 1 and B >= 1, got A={self.A} B={self.B}")


# Named settings used by the CLI, the benchmark and the service.  For the same
# number of network evaluations per step (A x B), few candidates and many beams
# win: A=4, B=16 beats A=16, B=4 clearly, at the same cost (bench/RESULTS.md).
# `quality` is the setting of the published 8-byte figures; A=8, B=32 comes within
# about 1% of its MSE at a quarter of the cost.
ENCODERS = {
    "greedy": Encoder(A=1 << 30, B=1),  # the reference: all K codewords, one beam
    "fast": Encoder(A=4, B=4),  # 16 network evaluations per step, greedy's 256
    "balanced": Encoder(A=4, B=16),  # 64 per step; the default of the index and the service
    "quality": Encoder(A=32, B=32),  # 1024 per step: the lowest MSE
}


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
        first = QincoStep if cfg.nlist else PlainStep
        self.steps = nn.ModuleList([first(cfg)] + [QincoStep(cfg) for _ in range(cfg.M - 1)])
        self._coarse = None  # faiss index over the centroids, built on first use

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

    def _load_from_state_dict(self, *args, **kwargs):
        self._coarse = None
        super()._load_from_state_dict(*args, **kwargs)

    def centroids_raw(self) -> np.ndarray:
        return self.denormalize(self.centroids).detach().numpy()

    def assign(self, xn: torch.Tensor) -> torch.Tensor:
        """Nearest centroid of normalised vectors: (n, d) -> (n,) int64."""
        _, lists = self.coarse_index().search(np.ascontiguousarray(xn.float().cpu().numpy()), 1)
        return torch.from_numpy(lists[:, 0]).long()

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
    def encode_normalized(self, xn: torch.Tensor, encoder: Encoder, lists: torch.Tensor | None = None):
        """Beam search with candidate pre-selection.

        xn (n, d) normalised vectors -> codes (n, M) int64 and their reconstruction (n, d).
        """
        n, K = xn.shape[0], self.cfg.K
        A = min(encoder.A, K)
        xhat = self.start(lists, n).unsqueeze(1)  # (n, 1, d)
        codes = torch.zeros(n, 1, 0, dtype=torch.long, device=xn.device)
        for step in self.steps:
            beams = xhat.shape[1]
            residual = (xn.unsqueeze(1) - xhat).float()  # (n, beams, d)
            if A < K:  # cheap score against the base codebook
                cb = step.codebook
                score = (cb * cb).sum(-1) - 2 * residual @ cb.T  # (n, beams, K)
                cand = score.topk(A, dim=-1, largest=False).indices
            else:
                cand = torch.arange(K, device=xn.device).expand(n, beams, K)
            half = step.codeword_half() if isinstance(step, QincoStep) else None
            cw = step.candidates(cand, xhat) if half is None else step.candidates(cand, xhat, half)
            cw = cw.float()  # rank candidates in float32 even when the network ran in bf16
            err = (residual.unsqueeze(2) - cw).square().sum(-1).reshape(n, beams * A)
            best = err.topk(min(encoder.B, beams * A), dim=-1, largest=False).indices  # sorted
            parent = best // A
            chosen = cand.reshape(n, beams * A).gather(1, best)
            xhat = xhat.gather(1, parent.unsqueeze(-1).expand(-1, -1, xn.shape[1]))
            xhat = xhat + cw.reshape(n, beams * A, -1).gather(1, best.unsqueeze(-1).expand(-1, -1, xn.shape[1]))
            codes = torch.cat([codes.gather(1, parent.unsqueeze(-1).expand(-1, -1, codes.shape[2])),
                               chosen.unsqueeze(-1)], dim=2)
        return codes[:, 0], xhat[:, 0]


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


@torch.inference_mode()
def encode(model: Qinco, x, encoder: Encoder = ENCODERS["quality"], batch_size: int = 1024,
           progress=None) -> np.ndarray:
    """Raw vectors (n, d) -> codes (n, M) uint8, or (n, M+1) int32 with the IVF list first."""
    cfg = model.cfg
    x = check_vectors(x, cfg.d)
    out = np.empty((len(x), code_width(cfg)), dtype=code_dtype(cfg))
    for i0 in range(0, len(x), batch_size):
        xn = model.normalize(torch.from_numpy(x[i0:i0 + batch_size]))
        lists = model.assign(xn) if cfg.nlist else None
        codes, _ = model.encode_normalized(xn, encoder, lists)
        if cfg.nlist:
            codes = torch.cat([lists[:, None], codes], 1)
        out[i0:i0 + len(codes)] = codes.numpy()
        if progress is not None:
            progress.update(len(codes))
    return out


def split_codes(model: Qinco, codes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a code array; returns (codes (n, m) int64, lists (n,) or None)."""
    cfg = model.cfg
    codes = np.asarray(codes)
    lead = 1 if cfg.nlist else 0
    if codes.ndim != 2 or not 1 - lead <= codes.shape[1] - lead <= cfg.M:
        want = f"(n, 1 + m) with 0 <= m <= {cfg.M}" if lead else f"(n, m) with 1 <= m <= {cfg.M}"
        raise ValueError(f"codes must have shape {want}, got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    codes = torch.from_numpy(codes.astype(np.int64))
    if codes[:, lead:].numel() and (codes[:, lead:].min() < 0 or codes[:, lead:].max() >= cfg.K):
        raise ValueError(f"codes must lie in [0, {cfg.K})")
    lists = None
    if lead:
        lists = codes[:, 0]
        if codes.numel() and (lists.min() < 0 or lists.max() >= cfg.nlist):
            raise ValueError(f"IVF list numbers must lie in [0, {cfg.nlist})")
    return codes[:, lead:], lists


@torch.inference_mode()
def decode(model: Qinco, codes, batch_size: int = 1024) -> np.ndarray:
    """Codes (n, [1 +] m) -> raw vectors (n, d) float32.

    m < M decodes a prefix: any prefix of a QINCo code is a valid lower-rate code.
    Small batches keep the (batch, h) activations in cache: 8192 rows ran 1.5-2x slower.
    """
    codes, lists = split_codes(model, codes)
    out = np.empty((len(codes), model.cfg.d), dtype=np.float32)
    for i0 in range(0, len(codes), batch_size):
        sl = slice(i0, i0 + batch_size)
        xn = model.decode_normalized(codes[sl], None if lists is None else lists[sl])
        out[sl] = model.denormalize(xn).numpy()
    return out
