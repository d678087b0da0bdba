"""The approximate decoder: fixed additive tables fitted to QINCo codes.

Given codes (n, M) and targets (n, d) (a vector minus its IVF centroid), find
M tables T_m of K x d minimising sum_i ||sum_m T_m[codes[i, m]] - target_i||².
That is least squares with a one-hot design matrix S (n, M*K); the normal
equations S^T S T = S^T R are only (M*K)² and are built by counting code
pairs, never by forming S.  The tables turn QINCo codes into an ordinary
additive-quantizer code, which faiss scores with look-up tables.
"""

from __future__ import annotations

import numpy as np
import torch

from .network import Encoder, Qinco, encode


def fit_tables(codes: np.ndarray, targets: np.ndarray, K: int, ridge: float = 1e-4) -> np.ndarray:
    """codes (n, M) ints in [0, K), targets (n, d) -> tables (M, K, d) float32."""
    codes = np.asarray(codes, dtype=np.int64)
    n, M = codes.shape
    d = targets.shape[1]
    if len(targets) != n:
        raise ValueError(f"{n} codes but {len(targets)} targets")
    c = torch.from_numpy(codes)
    gram = torch.zeros(M * K, M * K, dtype=torch.float64)
    for a in range(M):
        for b in range(a, M):
            pairs = torch.bincount(c[:, a] * K + c[:, b], minlength=K * K).view(K, K).double()
            gram[a * K:(a + 1) * K, b * K:(b + 1) * K] = pairs
            gram[b * K:(b + 1) * K, a * K:(a + 1) * K] = pairs.T
    flat = c + torch.arange(M) * K  # column of each (step, codeword) in S
    rhs = torch.zeros(M * K, d, dtype=torch.float64)
    r = torch.from_numpy(np.asarray(targets, dtype=np.float64))
    for m in range(M):
        rhs.index_add_(0, flat[:, m], r)
    # A small ridge keeps unused codewords at zero and the system well posed.
    gram += torch.eye(M * K, dtype=torch.float64) * ridge * max(1.0, float(gram.diagonal().mean()))
    tables = torch.linalg.solve(gram, rhs)
    return tables.view(M, K, d).float().numpy()


def decode_tables(tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """sum_m tables[m, codes[:, m]]: (M, K, d), (n, M) -> (n, d)."""
    codes = np.asarray(codes, dtype=np.int64)
    return tables[np.arange(codes.shape[1]), codes].sum(1)


def fit_model_tables(model: Qinco, x: np.ndarray, encoder: Encoder) -> float:
    """Fit an IVF model's approximate-decoder tables on raw vectors x; returns their MSE.

    The codes come from the model's own encoder, as they will in the index.
    """
    if not model.cfg.nlist:
        raise ValueError("fixed tables belong to IVF models (train with --nlist)")
    codes = encode(model, x, encoder)
    centroids = model.centroids_raw()[codes[:, 0]]
    tables = fit_tables(codes[:, 1:], x - centroids, model.cfg.K)
    residual = decode_tables(tables, codes[:, 1:])
    approx = centroids + residual
    norms = (residual ** 2).sum(1)  # faiss's IVF scanner adds ||r̂||² to its look-up-table sums
    with torch.no_grad():
        model.tables.copy_(torch.from_numpy(tables))
        model.norm_range.copy_(torch.tensor([norms.min(), norms.max()]))
    return float(((x - approx) ** 2).sum(1).mean())
