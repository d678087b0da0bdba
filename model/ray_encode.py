"""Bulk encoding on a Ray cluster (optional extra: `pip install -e '.[ray]'`).

The base is cut into the same segments a single-process run encodes one at a time
(`chunk` rows from row 0, each encoded with `encode(model, segment, encoder, batch_size)`),
so every vector is encoded in a batch of the same composition and the codes are
identical to a local run.  Segments are grouped into blocks that carry their row
numbers; Ray Data `map_batches` sends whole blocks to a pool of actors, each of which
loads the model once from its safetensors file (never a pickled module) and uses as
many torch threads as it has CPUs.  Results come back in row order, checked against
the row numbers they carry.

Where the cluster lists GPUs (and the device is not `cpu`), there is one actor per GPU and
each encodes on its own (`encode(..., device)`: bf16 autocast), so the codes are those of one
process on a GPU; an actor whose torch sees no CUDA device encodes on its CPUs under `auto`.

The vectors travel through the object store from the driver: the base file does not
have to be visible to the other nodes, but it all passes through the driver node's
object store (Ray spills to disk when it does not fit in memory).  The model file goes
as its bytes to nodes where its path is missing.  The driver must be a node of the
cluster (`--ray HEAD:6379` or `--ray auto`): Ray Data does not run through Ray Client
(`ray://`).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .io import sha256
from .network import Encoder

BLOCK_BYTES = 8 << 20  # vectors per block: about this many bytes (several segments), or fewer for balance


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[data]')") from None
    return ray


@dataclass
class ActorStats:
    """Work done by one actor: vectors, seconds spent encoding them, and where it ran."""
    actor: str
    vectors: int = 0
    busy_s: float = 0.0

    @property
    def vec_per_s(self) -> float:
        return self.vectors / self.busy_s if self.busy_s else 0.0


@dataclass
class RayRun:
    """What a run did; filled in while it goes (per-actor figures at the end)."""
    address: str = ""
    actors: int = 0
    threads_per_actor: int = 1
    blocks: int = 0
    startup_s: float = 0.0  # cluster connection + shipping the vectors
    wall_s: float = 0.0  # first block sent to last result received (includes actor start)
    vectors: int = 0
    per_actor: dict[str, ActorStats] = field(default_factory=dict)

    def report(self) -> str:
        lines = [f"ray {self.address}: {self.vectors} vectors, {self.actors} actors x {self.threads_per_actor} "
                 f"threads, {self.blocks} blocks; {self.wall_s:.1f} s encoding "
                 f"({self.vectors / max(self.wall_s, 1e-9):.0f} vec/s overall), {self.startup_s:.1f} s start-up"]
        lines.append(f"  {'actor':<28} {'vectors':>9} {'busy s':>8} {'vec/s':>8}")
        for s in sorted(self.per_actor.values(), key=lambda s: s.actor):
            lines.append(f"  {s.actor:<28} {s.vectors:>9} {s.busy_s:>8.1f} {s.vec_per_s:>8.0f}")
        return "\n".join(lines)


class EncoderActor:
    """A Ray Data map_batches worker: loads the model once, encodes whole segments."""

    def __init__(self, model_path: str, model_sha256: str, model_bytes_ref: list, encoder: dict,
                 chunk: int, batch_size: int | None, threads: int, device: str):
        from . import io
        from .threads import set_threads
        set_threads(threads)
        self.device = actor_device(device)
        path = Path(model_path)
        if not (path.is_file() and sha256(path) == model_sha256):
            # Not on this node (or another version there): the driver's copy of the file's bytes.
            import ray
            tmp = Path(tempfile.mkdtemp(prefix="qinco-model-"))
            try:
                (tmp / path.name).write_bytes(ray.get(model_bytes_ref[0]))
                self.model = io.load_model(tmp / path.name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            self.model = io.load_model(path)
        self.encoder = Encoder(**encoder)
        self.chunk = chunk
        self.encode_kwargs = {} if batch_size is None else {"batch_size": batch_size}
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.device.type}"

    def __call__(self, block):
        import pyarrow as pa
        from .network import code_dtype, code_width, encode
        rows = block["row"].to_numpy()
        x = _vectors(block["vector"], len(rows))
        t0 = time.perf_counter()
        out = []
        for seg in _segments(rows, self.chunk):  # one local encode() call per segment, as in one process
            out.append(encode(self.model, x[seg], self.encoder, device=self.device, **self.encode_kwargs))
        if out:
            codes = np.concatenate(out)
        else:
            codes = np.empty((0, code_width(self.model.cfg)), dtype=code_dtype(self.model.cfg))
        busy = time.perf_counter() - t0
        return pa.table({
            "row": pa.array(rows),
            "codes": pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel()), codes.shape[1]),
            "actor": pa.array([self.name] * len(rows)).dictionary_encode(),
            "busy": pa.array(np.full(len(rows), busy / max(len(rows), 1))),
        })


def actor_device(device: str):
    """An actor's torch device: Ray made the GPU it gave the actor, if any, the only one it sees."""
    import torch
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda with --ray: torch sees no CUDA device in an actor given a GPU "
                         "(a CPU build of torch on that node?)")
    return torch.device("cuda", 0)


def last_line(e: Exception) -> str:
    """The error an actor raised, from the end of Ray's report of it."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _vectors(column, n: int) -> np.ndarray:
    """A FixedSizeList column -> (n, d) numpy array."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


def _segments(rows: np.ndarray, chunk: int) -> list[slice]:
    """Positions of runs of consecutive rows within one chunk-aligned segment."""
    if not len(rows):
        return []
    cut = np.flatnonzero((np.diff(rows) != 1) | (np.diff(rows // chunk) != 0)) + 1
    edges = np.concatenate([[0], cut, [len(rows)]])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def connect(address: str | None):
    """ray.init: a new local cluster for None/'local', else the given cluster.  Returns (ray, started)."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray, False
    if address and address.startswith("ray://"):
        raise ValueError("ray:// (Ray Client) cannot run a Ray Data pipeline: run qinco on a node of the cluster "
                         "with --ray HEAD:6379 (or --ray auto), e.g. through `ray job submit`")
    if address in (None, "", "local"):
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        # The driver's copy of this package goes with the job, so that every node runs the same code.
        try:
            ray.init(address=address, log_to_driver=False,
                     runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
        except (ConnectionError, RuntimeError) as e:
            raise ValueError(f"cannot connect to the Ray cluster at {address} ({str(e).splitlines()[0]}); "
                             "a cluster started with `ray start` wants its token: RAY_AUTH_MODE=token and "
                             "~/.ray/auth_token (or RAY_AUTH_TOKEN) as on the head node") from None
    return ray, True


@dataclass
class Placement:
    """How many actors, and what each asks Ray for."""
    actors: int
    threads: int  # torch threads per actor
    num_cpus: float
    num_gpus: float
    device: str  # what each actor uses: cpu, or auto / cuda (its GPU; `actor_device`)


def placement(cpus: int, node_cpus: int, gpus: float, actors: int, device: str, cpus_per_gpu: float = 0) -> Placement:
    """Actors for a cluster of `cpus` CPUs (at most `node_cpus` on a node) and `gpus` GPUs, whose GPU
    nodes have at least `cpus_per_gpu` CPUs per GPU.  device cpu: one actor per CPU; auto: one per
    GPU where the cluster has GPUs, else as cpu; cuda (cuda:N: Ray chooses the GPUs): one per GPU,
    and a cluster without GPUs is an error.  `actors` > 0 overrides the count: the CPUs, or the
    GPUs in equal shares that fit one GPU, are then shared between them."""
    kind = device.split(":")[0]
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and gpus <= 0:
        raise ValueError("--device cuda with --ray: the Ray cluster lists no GPU (ray start --num-gpus N "
                         "on its GPU nodes), or use --device auto / cpu")
    if gpus <= 0 or kind == "cpu":
        actors = actors or cpus
        threads = max(1, min(cpus // actors, node_cpus))  # an actor lives on one node
        num_cpus = threads if actors <= cpus else cpus / actors  # more actors than CPUs: they share
        return Placement(actors, threads, num_cpus, 0.0, "cpu")
    actors = actors or max(1, int(gpus))
    # A share that whole GPUs divide into (2 GPUs, 3 actors: halves, not thirds that no GPU holds).
    num_gpus = 1.0 / math.ceil(actors / int(gpus)) if gpus >= 1 else gpus / actors
    cpu_share = cpus_per_gpu * num_gpus  # of its GPU node's CPUs
    threads = max(1, int(cpu_share))
    return Placement(actors, threads, min(threads, cpu_share), num_gpus, kind)


def encode_on_ray(model_path, x: np.ndarray, encoder: Encoder, chunk: int, batch_size: int | None = None,
                  address: str | None = "local", actors: int = 0, progress=None,
                  run: RayRun | None = None, device: str = "auto") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode x on a Ray cluster; yields (rows, codes) one segment at a time, in row order.

    The codes are those of a single process encoding x[i:i + chunk] for i = 0, chunk, ... with
    `encode(model, segment, encoder, batch_size)` (batch_size None: encode's default, as
    QincoIndex.encode does), on the CPU or, where the actors have GPUs, on a GPU.  `actors` 0:
    one per cluster GPU (device auto or cuda) or CPU (`placement`); otherwise the cluster's
    CPUs and GPUs are shared between them (each actor uses cluster CPUs / actors threads).
    """
    from . import io
    from .network import code_width

    if chunk < 1:
        raise ValueError(f"--batch must be positive, got {chunk}")
    model_path = Path(model_path)
    cfg = io.load_model(model_path).cfg
    if x.ndim != 2 or x.shape[1] != cfg.d:
        raise ValueError(f"expected dim {cfg.d}, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"vectors must be real numbers, got dtype {x.dtype}")
    n = len(x)
    if n == 0:
        raise ValueError("vectors is empty: need at least one vector")
    run = run if run is not None else RayRun()
    t_start = time.perf_counter()
    ray, started = connect(address)
    try:
        import pyarrow as pa
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False

        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)))
        nodes = [nd["Resources"] for nd in ray.nodes() if nd.get("Alive")]
        node_cpus = max([int(r.get("CPU", 0)) for r in nodes] or [1])
        cpus_per_gpu = min([r.get("CPU", 0) / r["GPU"] for r in nodes if r.get("GPU", 0) > 0] or [0])
        place = placement(cpus, node_cpus, float(resources.get("GPU", 0)), actors, device, cpus_per_gpu)
        actors = place.actors
        run.address = address or "local"
        run.actors, run.threads_per_actor = actors, place.threads

        # Blocks of whole segments: about BLOCK_BYTES each, but at least ~4 blocks per actor.
        n_seg = math.ceil(n / chunk)
        seg_bytes = chunk * x.shape[1] * 4
        per_block = max(1, min(BLOCK_BYTES // max(seg_bytes, 1), n_seg // (4 * actors)))
        refs = []
        for b0 in range(0, n, per_block * chunk):
            b1 = min(n, b0 + per_block * chunk)
            xb = np.ascontiguousarray(x[b0:b1])  # shipped as stored (uint8 stays uint8); actors make it float32
            if np.issubdtype(xb.dtype, np.floating) and not np.isfinite(xb).all():
                raise ValueError("vectors contain NaN or Inf")
            table = pa.table({"row": pa.array(np.arange(b0, b1, dtype=np.int64)),
                              "vector": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel()), xb.shape[1])})
            refs.append(ray.put(table))
        run.blocks = len(refs)
        ds = ray.data.from_arrow_refs(refs)
        del refs
        model_bytes_ref = [ray.put(model_path.read_bytes())]  # in a list: fetched only where the path is missing
        ds = ds.map_batches(
            # Whole blocks (Ray wants a size with GPUs: a block's, so a batch is still one block)
            EncoderActor, batch_size=per_block * chunk if place.num_gpus else None, batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=place.num_cpus, num_gpus=place.num_gpus,
            fn_constructor_kwargs=dict(model_path=str(model_path.resolve()), model_sha256=sha256(model_path),
                                       model_bytes_ref=model_bytes_ref, encoder=asdict(encoder), chunk=chunk,
                                       batch_size=batch_size, threads=place.threads, device=place.device))
        run.startup_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        seen = np.zeros(n, dtype=bool)
        width = code_width(cfg)
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                rows = out["row"].to_numpy()
                if not len(rows):
                    continue
                codes = _vectors(out["codes"], len(rows))
                if codes.shape[1:] != (width,) or rows.min() < 0 or rows.max() >= n:
                    raise RuntimeError(f"ray: unexpected result block (rows {rows[:3]}..., codes {codes.shape})")
                if seen[rows].any():
                    raise RuntimeError("ray: some rows came back twice")
                seen[rows] = True
                names = np.array(out["actor"].to_pylist(), dtype=object)
                busy = out["busy"].to_numpy()
                for name in np.unique(names):
                    mask = names == name
                    s = run.per_actor.setdefault(name, ActorStats(name))
                    s.vectors += int(mask.sum())
                    s.busy_s += float(busy[mask].sum())
                order = np.argsort(rows, kind="stable")
                rows, codes = rows[order], codes[order]
                for seg in _segments(rows, chunk):
                    yield rows[seg], codes[seg]
                run.vectors += len(rows)
                if progress is not None:
                    progress.update(len(rows))
        except ray.exceptions.RayError as e:  # an actor's own error (its device, its file): its message
            raise ValueError(f"ray: an encoding actor failed: {last_line(e)}") from None
        run.wall_s = time.perf_counter() - t0
        if not seen.all():
            raise RuntimeError(f"ray: {int((~seen).sum())} of {n} rows did not come back")
    finally:
        if started:
            ray.shutdown()
