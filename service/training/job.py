"""A collection's background training job, seen from the server.

A job trains a model on a sample of the collection's original vectors (or takes a model file the
user gave), encodes every point with it, and hands the result to its `swap` (the engine's
Trainer.swap), which switches to it atomically.  The heavy work runs in a child process
(service/training/worker.py); the job's thread (started by the engine: `run`) starts it, reads
its progress, stops it on cancel, and calls the swap.

The job's record (id, kind, request) is a row of the collection's SQLite `state` table, written
when it starts and removed by the swap's transaction (or on cancel or failure).  A job whose
row is still there when the collection opens (the server died) starts again by itself; a model
it had finished training (JOB_DIR/trained.json) is kept and only the encoding runs again.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from model.io import atomic_write

log = logging.getLogger("qinco.jobs")


LOG_EVERY = 60  # seconds between progress lines in the server log


def progress_line(status: dict) -> str:
    """'training 42%, ETA 12 min, validation MSE 0.0123 (0.961 x RQ)' from a job's status."""
    line = f"{status['phase']} {100 * status['progress']:.0f}%"
    if status["eta_seconds"] is not None:
        line += f", ETA {status['eta_seconds'] / 60:.1f} min"
    if status["phase"] == "encoding" and status["points_total"]:
        line += f", {status['points_encoded']:,} of {status['points_total']:,} points"
    if status["val_mse"] is not None:
        line += f", validation MSE {status['val_mse']:.5g}"
        if status["rq_val_mse"]:
            line += f" ({status['val_mse'] / status['rq_val_mse']:.3f} x RQ)"
    return line


class JobCancelled(Exception):
    pass


class TrainingJob:
    def __init__(self, name: str, jobs: Path, database: Path, record: dict, threads: int, encode_threads: int,
                 device: str, swap: Callable[[TrainingJob], int], failed: Callable[[TrainingJob, str], None]):
        """name: the collection's; jobs: its jobs folder; database: its points.sqlite; record:
        {"id", "kind", "request", "started"}, what the record's `job` fact holds; swap(job) -> the
        generation it serves; failed(job, reason); threads: the worker's while training, encode_threads
        while encoding."""
        self.name, self.database, self.record, self.device = name, database, record, device
        self.threads, self.encode_threads = threads, encode_threads
        self.dir: Path = jobs / record["id"]
        self._swap, self._failed = swap, failed
        self.phase = "queued"  # queued, training, encoding, swapping
        self.cancelled = threading.Event()
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()  # the process handle (a leaf lock: it takes no other)
        self.thread: threading.Thread | None = None  # running `run`, set by whoever starts it

    @property
    def id(self) -> str:
        return self.record["id"]

    def cancel(self, wait: bool = True):
        """Stop the worker; the collection keeps serving what it served before."""
        self.cancelled.set()
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
        if wait and self.thread is not None and threading.current_thread() is not self.thread:
            self.thread.join(timeout=60)

    def status(self) -> dict:
        """The job's phase and the worker's last progress report."""
        progress = {}
        try:
            progress = json.loads((self.dir / "progress.json").read_text())
        except (OSError, ValueError):
            pass
        phase = self.phase if self.phase in ("queued", "swapping") else progress.get("phase", self.phase)
        request = self.record["request"]
        done = progress.get("progress", 0.0) if phase == progress.get("phase") else 0.0
        return {"id": self.id, "kind": self.record["kind"], "phase": phase,
                "progress": 1.0 if phase == "swapping" else done,
                "eta_seconds": progress.get("eta_seconds") if phase == progress.get("phase") else None,
                "started": self.record["started"], "minutes": request.get("minutes"),
                "points_encoded": progress.get("points_encoded", 0), "points_total": progress.get("points_total"),
                "val_mse": progress.get("val_mse"), "rq_val_mse": progress.get("rq_val_mse")}

    # ---- the job's thread -----------------------------------------------------------------
    def run(self):
        try:
            self.dir.parent.mkdir(exist_ok=True)
            self.dir.mkdir(exist_ok=True)  # not parents: never recreate a deleted collection's folder
            for stale in ("progress.json", "encoded.json", "error.txt"):  # of an interrupted run
                (self.dir / stale).unlink(missing_ok=True)
            request = {**self.record["request"], "database": str(self.database),
                       "kind": self.record["kind"], "threads": self.threads,
                       "encode_threads": self.encode_threads, "device": self.device}
            atomic_write(self.dir / "request.json", lambda f: f.write(json.dumps(request).encode()))
            self.phase = "training"
            self._work()
            self.phase = "swapping"
            generation = self._swap(self)
            log.info("%s: job %s done: serving model generation %d", self.name, self.id, generation)
        except JobCancelled:
            log.info("%s: job %s cancelled", self.name, self.id)
        except Exception as e:
            if self.cancelled.is_set():
                log.info("%s: job %s cancelled", self.name, self.id)
            else:
                log.exception("%s: job %s failed", self.name, self.id)
                self._failed(self, f"{type(e).__name__}: {e}")
        # Its folder goes with its record (Trainer._end, Trainer.swap): a folder without a
        # record is removed at the next open, and one with a record lets the job resume.

    def _work(self):
        """Run the worker to the end (train if needed, then encode)."""
        if self.cancelled.is_set():
            raise JobCancelled()
        env = {**os.environ, "TQDM_DISABLE": "1"}  # its log lines go to the server log; no bars
        with self._lock:
            if self.cancelled.is_set():
                raise JobCancelled()
            self._process = subprocess.Popen([sys.executable, "-m", "service.training.worker", str(self.dir)],
                                             env=env, stdin=subprocess.DEVNULL)
        last_phase, last_log = None, 0.0
        while self._process.poll() is None:
            time.sleep(0.2)
            status = self.status()
            if status["phase"] != last_phase or time.monotonic() - last_log >= LOG_EVERY:
                last_phase, last_log = status["phase"], time.monotonic()
                log.info("%s: job %s %s", self.name, self.id, progress_line(status))
        if self.cancelled.is_set():
            raise JobCancelled()
        if self._process.returncode != 0:
            reason = (self.dir / "error.txt").read_text() if (self.dir / "error.txt").exists() else \
                f"the training worker exited with code {self._process.returncode}"
            raise RuntimeError(reason)

    def outputs(self) -> tuple[Path, dict, dict]:
        """The finished model file, its figures, and the encoding's manifest."""
        trained = json.loads((self.dir / "trained.json").read_text())
        encoded = json.loads((self.dir / "encoded.json").read_text())
        return self.dir / "model.safetensors", trained, encoded
