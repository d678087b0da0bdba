"""Vector files (.npy, .fvecs, .bvecs, .ivecs) and model checkpoints.

A checkpoint is one safetensors file: the weights, and in its metadata the
JSON config, normalisation and training summary.  Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .network import Qinco, QincoConfig

FORMAT = "qinco-search/model"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model file that is missing, corrupt or does not match what is expected."""


# ---- vector files -------------------------------------------------------------------------

def _read_vecs(path: Path, dtype, mmap: bool) -> np.ndarray:
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
    if raw.size < 4:
        raise ValueError(f"{path}: empty or truncated vector file")
    d = int(raw[:4].view(np.int32)[0])
    row = 4 + d * np.dtype(dtype).itemsize
    if d <= 0 or raw.size % row:
        raise ValueError(f"{path}: not a {path.suffix} file (dimension {d}, size {raw.size})")
    return raw.reshape(-1, row)[:, 4:].view(dtype)


def read_vectors(path, mmap: bool = False) -> np.ndarray:
    """Load (n, d) vectors as stored (float32, float16, uint8, ...)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such vector file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    elif suffix == ".fvecs":
        x = _read_vecs(path, np.float32, mmap)
    elif suffix == ".bvecs":
        x = _read_vecs(path, np.uint8, mmap)
    elif suffix == ".ivecs":
        x = _read_vecs(path, np.int32, mmap)
    else:
        raise ValueError(f"{path}: unknown vector format {suffix!r} (use .npy, .fvecs, .bvecs or .ivecs)")
    if x.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array, got shape {x.shape}")
    return x


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def write_vectors(path, x: np.ndarray):
    path = Path(path)
    if path.suffix.lower() != ".npy":
        raise ValueError(f"{path}: output files are .npy")
    atomic_write(path, lambda f: np.save(f, x, allow_pickle=False))


def sha256(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write):
    """Write through a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_folder(folder: Path):
    """Make renames and new files in a folder durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- checkpoints --------------------------------------------------------------------------

def save_model(model: Qinco, path, extra: dict | None = None):
    """Write weights + config atomically.  `extra` (JSON-able) goes in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "config": json.dumps(model.cfg.to_dict()), "extra": json.dumps(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_model_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint, checked for format; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such model file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors model file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a QINCo Search model (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: model format version {meta.get('format_version')} "
                              f"is not supported (this build reads {FORMAT_VERSION})")
    try:
        meta["config"] = json.loads(meta["config"])
        meta["extra"] = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged model metadata ({e})") from None
    return tensors, meta


OPTIONAL_TENSORS = {"seed_codebooks"}  # absent from files written before seeds: a model without them


def load_model(path, with_extra: bool = False):
    """Rebuild a Qinco model from its file (eval mode)."""
    tensors, meta = read_model_file(path)
    try:
        cfg = QincoConfig.from_dict(meta["config"])
        model = Qinco(cfg)
        model.load_state_dict(tensors, strict=False)
        missing = set(model.state_dict()) - set(tensors) - OPTIONAL_TENSORS
        unexpected = set(tensors) - set(model.state_dict())
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not match the config ({e})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.eval()
    return (model, meta["extra"]) if with_extra else model


# ---- interoperability -----------------------------------------------------------------------

def to_faiss_qinco(model: Qinco) -> faiss.IndexQINCo:
    """The same network as a faiss IndexQINCo (normalised space; plain, non-IVF models)."""
    cfg = model.cfg
    if cfg.nlist or cfg.de or cfg.rank:
        raise ValueError("faiss IndexQINCo holds only plain QINCo (no IVF, de or low rank)")
    index = faiss.IndexQINCo(cfg.d, cfg.M, cfg.nbits, cfg.L, cfg.h)
    q = index.qinco
    faiss.copy_array_to_vector(model.steps[0].codebook.detach().numpy().ravel(), q.codebook0.weight)
    for m in range(1, cfg.M):
        src, dst = model.steps[m], q.get_step(m - 1)
        faiss.copy_array_to_vector(src.codebook.detach().numpy().ravel(), dst.codebook.weight)
        weight = torch.cat([src.concat_codeword.weight, src.concat_context.weight], 1)
        dst.MLPconcat.from_array(weight.detach().numpy(), src.concat_context.bias.detach().numpy())
        for l, block in enumerate(src.blocks):
            dst.get_residual_block(l).linear1.from_torch(block.up)
            dst.get_residual_block(l).linear2.from_torch(block.down)
    index.is_trained = True
    return index
