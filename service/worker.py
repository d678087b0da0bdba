"""The training worker: a child process that trains a collection's model and encodes its points.

    python -m service.worker JOB_DIR

JOB_DIR/request.json says what to do (written by service/jobs.py):
  {"database": points.sqlite, "kind": "train" | "swap_in", "minutes", "bytes", "nlist",
   "encoder", "sample", "threads", "seed"}
The worker reads the collection's original vectors from SQLite (read-only) and writes only into
JOB_DIR, each file atomically:
  progress.json  phase, progress 0-1, ETA, validation MSE (rewritten about once a second)
  model.safetensors, trained.json   the trained model and its figures (training done)
  ids.i64, codes.i32, encoded.json  every point's id and codes as of sequence number `seq`
  error.txt      why it failed
A separate process keeps the server responsive (no GIL shared with the requests), runs at a
lower priority with its own thread budget, and can be stopped at any moment; it exits by itself
when the server that started it dies.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

MIN_PER_LIST = 32  # training points per IVF list at least
MIN_TRAIN_POINTS = 1000  # below this the residual codebooks (K = 256) cannot be fitted
ENCODE_CHUNK = 4096
NICE = 10


def auto_nlist(n: int) -> int:
    """IVF lists for n points: a power of two near 4 sqrt(n), with MIN_PER_LIST points per list
    (64 on average) so that k-means has enough of them."""
    target = min(4 * math.sqrt(n), n / (2 * MIN_PER_LIST))
    return max(1, 1 << int(math.floor(math.log2(max(target, 1)))))


def min_points(nlist: int | None) -> int:
    """The fewest points a model of nlist lists (None: chosen from the count) can train on."""
    return max(MIN_TRAIN_POINTS, (nlist or 1) * MIN_PER_LIST)


def model_config(d: int, n: int, code_bytes: int, nlist: int | None):
    """The architecture for n training points: a smaller network for small sets (it overfits less
    and takes more steps per minute), and narrower blocks for high d (`default_de`)."""
    from model.network import QincoConfig, default_de
    return QincoConfig(d=d, M=code_bytes, K=256, L=2, h=128 if n < 50_000 else 256, de=default_de(d),
                       nlist=nlist or auto_nlist(n))


def write_json(path: Path, obj: dict):
    from model.io import atomic_write
    atomic_write(path, lambda f: f.write(json.dumps(obj).encode()))


class Progress:
    """progress.json, written at most once a second (and always on a phase change)."""

    def __init__(self, job_dir: Path):
        self.path, self.last, self.phase = job_dir / "progress.json", 0.0, None

    def __call__(self, phase: str, done: float, eta: float | None = None, **extra):
        now = time.time()
        if phase == self.phase and now - self.last < 1.0 and done < 1:
            return
        self.phase, self.last = phase, now
        write_json(self.path, {"phase": phase, "progress": round(min(max(done, 0.0), 1.0), 4),
                               "eta_seconds": None if eta is None else round(eta, 1), "time": now, **extra})


def watch_parent():
    """Exit when the server that started this worker is gone (killed, even by -9)."""
    parent = os.getppid()

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)
    threading.Thread(target=watch, daemon=True).start()


def connect(database: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=60)


def read_sample(db: sqlite3.Connection, d: int, n: int, seed: int) -> np.ndarray:
    """Up to n original vectors chosen at random, in one read transaction (points deleted
    meanwhile cannot leave holes): training never loads a whole large collection."""
    from service.store import select_by_ids
    db.execute("BEGIN")
    try:
        ids = np.array([r[0] for r in db.execute("SELECT id FROM originals")], dtype=np.int64)
        if len(ids) > n:
            ids = np.random.default_rng(seed).choice(ids, n, replace=False)
        blobs = [v for _, v in select_by_ids(db, "originals", "vector", ids)]
    finally:
        db.execute("COMMIT")
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), d)


def device() -> str:
    """QINCO_DEVICE, as the server's settings read it (this process inherits its environment)."""
    from service.settings import Settings
    return Settings().device


def train_model(job_dir: Path, request: dict, db: sqlite3.Connection, progress: Progress):
    from model.train import TrainConfig, train

    x = read_sample(db, request["d"], request["sample"], request["seed"])
    cfg = model_config(request["d"], len(x), request["bytes"], request.get("nlist"))
    tc = TrainConfig(max_minutes=request["minutes"], threads=request["threads"], seed=request["seed"], device=device(),
                     warmup=min(100_000, 5 * len(x)))
    started = time.time()

    def report(state, elapsed, budget):
        val = state.best_val_mse if math.isfinite(state.best_val_mse) else None
        rq = state.rq_val_mse if math.isfinite(state.rq_val_mse) else None
        progress("training", elapsed / max(budget, 1e-9), max(0.0, budget - elapsed),
                 val_mse=val, rq_val_mse=rq, vectors_seen=state.vectors_seen)

    progress("training", 0.0, request["minutes"] * 60)
    train(x, job_dir / "model.safetensors", cfg, tc, progress=report, report=False)
    from model.io import load_model
    _, extra = load_model(job_dir / "model.safetensors", with_extra=True)
    state = extra["training"]["state"]
    write_json(job_dir / "trained.json", {"val_mse": state["best_val_mse"], "rq_val_mse": state["rq_val_mse"],
                                          "trained_on": len(x), "seconds": round(time.time() - started, 1),
                                          "vectors_seen": state["vectors_seen"]})


def encode_all(job_dir: Path, request: dict, db: sqlite3.Connection, progress: Progress):
    """Every point's codes with the new model, as of one sequence number (one read transaction)."""
    from model.io import load_model
    from model.network import ENCODERS, encode

    from model.distributed import resolve_device
    model = load_model(job_dir / "model.safetensors")
    encoder, d, on = ENCODERS[request["encoder"]], request["d"], resolve_device(device())
    db.execute("BEGIN")  # a consistent snapshot: writes after `seq` are the server's to catch up
    seq = db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0]
    total = db.execute("SELECT count(*) FROM originals").fetchone()[0]
    rows = db.execute("SELECT id, vector FROM originals ORDER BY id")
    done, started = 0, time.time()
    with open(job_dir / "ids.i64", "wb") as fi, open(job_dir / "codes.i32", "wb") as fc:
        while batch := rows.fetchmany(ENCODE_CHUNK):
            ids = np.array([r[0] for r in batch], dtype=np.int64)
            x = np.frombuffer(b"".join(r[1] for r in batch), dtype=np.float32).reshape(-1, d)
            fi.write(ids.tobytes())
            fc.write(encode(model, x, encoder, device=on).astype(np.int32).tobytes())
            done += len(batch)
            rate = done / max(time.time() - started, 1e-9)
            progress("encoding", done / max(total, 1), (total - done) / rate, points_encoded=done,
                     points_total=total)
        for f in (fi, fc):
            f.flush()
            os.fsync(f.fileno())
    db.execute("COMMIT")
    write_json(job_dir / "encoded.json", {"seq": seq, "n": done, "width": 1 + model.cfg.M})


def main(job_dir: str):
    job_dir = Path(job_dir)
    os.nice(NICE)  # searches and writes come first
    watch_parent()
    request = json.loads((job_dir / "request.json").read_text())
    from model.threads import set_threads
    set_threads(request["threads"])
    progress = Progress(job_dir)
    try:
        db = connect(request["database"])
        if not (job_dir / "trained.json").exists():  # a resumed job keeps a model it finished
            if request["kind"] != "train":
                raise RuntimeError("the job's model file is missing")
            train_model(job_dir, request, db, progress)
        encode_all(job_dir, request, db, progress)
    except BaseException as e:
        (job_dir / "error.txt").write_text(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1])
