"""The training worker: a child process that trains a collection's model and encodes its points.

    python -m service.training.worker JOB_DIR

JOB_DIR/request.json says what to do (written by service/training/job.py):
  {"database": points.sqlite, "kind": "train" | "swap_in", "minutes", "bytes", "nlist",
   "encoder", "sample", "threads", "encode_threads", "device", "seed", "originals": the space's ('originals_k'),
   "datatype": its originals file's}
The worker reads the space's original vectors (their rows in SQLite, read-only, and the originals
file beside it: service/engine/originals.py) and writes only into JOB_DIR, each file atomically:
  progress.json  phase, progress 0-1, ETA, validation MSE (rewritten about once a second)
  model.safetensors, trained.json   the trained model and its figures (training done)
  ids.i64, codes.i32, encoded.json  every point's id and codes as of sequence number `seq`
  error.txt      why it failed
A separate process keeps the server responsive (no GIL shared with the requests), runs at a
lower priority with its own thread budget, and can be stopped at any moment; it exits by itself
when the server that started it dies.
"""

from __future__ import annotations

import fcntl
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

from model.threads import set_threads
from service.engine.space_record import originals_as_of_now, sample_originals
from service.engine.sql import connect_read_only
from service.training.policy import NICE, model_config

ENCODE_CHUNK = 4096


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


def train_model(job_dir: Path, request: dict, db: sqlite3.Connection, progress: Progress):
    from model.train import TrainConfig, train

    x = sample_originals(db, Path(request["database"]).parent, request, request["sample"], request["seed"])
    cfg = model_config(request["d"], len(x), request["bytes"], request.get("nlist"))
    tc = TrainConfig(max_minutes=request["minutes"], threads=request["threads"], seed=request["seed"],
                     device=request.get("device", "auto"),
                     warmup=min(100_000, 5 * len(x)))
    started = time.time()

    def report(run, elapsed, budget):  # run: model/train.py's figures so far
        val = run.best_val_mse if math.isfinite(run.best_val_mse) else None
        rq = run.rq_val_mse if math.isfinite(run.rq_val_mse) else None
        progress("training", elapsed / max(budget, 1e-9), max(0.0, budget - elapsed),
                 val_mse=val, rq_val_mse=rq, vectors_seen=run.vectors_seen)

    progress("training", 0.0, request["minutes"] * 60)
    train(x, job_dir / "model.safetensors", cfg, tc, progress=report, report=False)
    from model.io import load_model
    _, extra = load_model(job_dir / "model.safetensors", with_extra=True)
    figures = extra["training"]["state"]
    write_json(job_dir / "trained.json", {"val_mse": figures["best_val_mse"], "rq_val_mse": figures["rq_val_mse"],
                                          "trained_on": len(x), "seconds": round(time.time() - started, 1),
                                          "vectors_seen": figures["vectors_seen"]})


def encode_all(job_dir: Path, request: dict, db: sqlite3.Connection, progress: Progress):
    """Every point's codes with the new model, as of one sequence number (one read transaction)."""
    from model.io import load_model
    from model.network import ENCODERS, encode

    from model.distributed import resolve_device
    model = load_model(job_dir / "model.safetensors")
    set_threads(request["encode_threads"])
    encoder, on = ENCODERS[request["encoder"]], resolve_device(request.get("device", "auto"))
    done, started = 0, time.time()
    with originals_as_of_now(db, Path(request["database"]).parent, request, ENCODE_CHUNK) \
            as (seq, total, batches), \
            open(job_dir / "ids.i64", "wb") as fi, open(job_dir / "codes.i32", "wb") as fc:
        for ids, x in batches:
            fi.write(ids.tobytes())
            fc.write(encode(model, x, encoder, device=on).astype(np.int32).tobytes())
            done += len(ids)
            rate = done / max(time.time() - started, 1e-9)
            progress("encoding", done / max(total, 1), (total - done) / rate, points_encoded=done,
                     points_total=total)
        for f in (fi, fc):
            f.flush()
            os.fsync(f.fileno())
    write_json(job_dir / "encoded.json", {"seq": seq, "n": done, "width": 1 + model.cfg.M})


def main(job_dir: str):
    job_dir = Path(job_dir)
    os.nice(NICE)  # searches and writes come first
    watch_parent()
    # One worker per job folder: the worker of a server killed a moment ago may not have seen it
    # yet (it is niced), and must not write this job's files beside this one.  Held until exit.
    fcntl.flock(os.open(job_dir / "worker.lock", os.O_CREAT | os.O_RDWR, 0o644), fcntl.LOCK_EX)
    request = json.loads((job_dir / "request.json").read_text())
    set_threads(request["threads"])
    progress = Progress(job_dir)
    try:
        db = connect_read_only(request["database"])
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
