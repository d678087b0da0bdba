"""A vector space's training lifecycle: collecting -> training -> encoding -> ready, and again on a
retrain.  Its facts live in the record (the `job`, `last_error`, `paused` and `model` rows), so a
kill -9 at any point resumes or restarts the job and serves the old model or the new, never a mix.

A job (service/training/job.py) trains in a child process; `swap` then serves its model: an
index with every point, then one transaction for the codes of every point and the generation.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.index import QincoIndex
from model.io import atomic_write, fsync_folder, load_model, save_model
from model.threads import use_threads

from ..errors import BadRequest, Conflict, NotFound
from ..memory import release_free_memory
from ..training.job import JobCancelled, TrainingJob
from ..training.policy import MIN_PER_LIST, MIN_RETRAIN_GROWTH, auto_nlist, min_points
from . import concurrency
from .index import QincoSpaceIndex

if TYPE_CHECKING:  # annotations only: the collection imports this module
    from .collection import Collection
    from .space import VectorSpace

log = logging.getLogger("qinco.store")


class Trainer:
    """Starts, cancels, resumes and swaps the training jobs of one vector space."""

    def __init__(self, collection: Collection, space: VectorSpace):
        self.c, self.space = collection, space

    # ---- starting ----------------------------------------------------------------------------------
    def start(self, request: dict | None = None, model_source: Path | None = None, auto: bool = False) -> dict:
        """Start a job: train a model on the originals (request: train_minutes, bytes, nlist), or take
        the model file `model_source`; encode every point; swap.  Returns the training status.
        auto: started by `maybe_train`, which a cancel or a failure since then overrules."""
        c, space, request = self.c, self.space, request or {}
        use_threads(c.config.threads)
        with c.locks.write:
            c.check_writable()
            if c.closing:
                raise NotFound(f"collection {c.name!r} is closing")
            if auto and (space.facts.get("paused") or space.facts.get("last_error")):
                raise Conflict(f"automatic training of {space.label} is paused")  # _auto_train: quiet
            if space.job is not None:
                raise Conflict(f"{space.label} of collection {c.name!r} is already training (job {space.job.id}); "
                               f"wait for it or cancel it with DELETE /collections/{c.name}/train")
            if not space.keeps_originals:
                raise BadRequest(f"{space.label} of collection {c.name!r} keeps no original vectors, so it cannot be "
                                 f"re-encoded: create it by size and distance (with keep_originals) to train it")
            n = space.record.count("original_rows")
            settings = {**space.settings, **{k: v for k, v in request.items() if v is not None}}
            given = self._check_model(model_source) if model_source is not None else None
            if given is None:
                self._check_enough(settings, n)
            record = {"id": uuid.uuid4().hex[:12], "kind": "train" if given is None else "swap_in",
                      "started": time.time(),
                      "request": {"d": space.dimension, "minutes": settings["train_minutes"],
                                  "bytes": settings["bytes"], "nlist": settings.get("nlist"),
                                  "encoder": space.encoder_name, "sample": c.config.train_sample,
                                  "originals": space.record.table("originals"),
                                  "datatype": space.record.file.datatype,
                                  "seed": space.generation}}  # reproducible: the same data, the same model
            job = self._job(record)
            if given is not None:  # the job starts at the encoding
                job.dir.mkdir(parents=True, exist_ok=True)
                save_model(given, job.dir / "model.safetensors")
                unknown = {"val_mse": None, "rq_val_mse": None, "trained_on": None}
                atomic_write(job.dir / "trained.json", lambda f: f.write(json.dumps(unknown).encode()))
            with c.record.transaction():
                space.record.put_fact("job", record)
                space.record.drop_facts("paused")
            space.facts.pop("paused", None)
            space.facts["job"] = record
            self._launch(job)
        log.info("%s: %s: job %s started (%s, %d points)", c.name, space.label, job.id, record["kind"], n)
        return self.status()

    def _check_model(self, path: Path):
        """A user's model file that this space can serve."""
        try:
            model = load_model(path)
            QincoIndex(model)  # an IVF model with fitted tables
        except Exception as e:
            raise BadRequest(f"cannot use {path.name}: {type(e).__name__}: {e}") from None
        if model.cfg.d != self.space.dimension:
            raise BadRequest(f"the model is for dimension {model.cfg.d}; the collection's is {self.space.dimension}")
        return model

    def _check_enough(self, settings: dict, n: int):
        need = min_points(settings.get("nlist"))
        if need > self.c.config.train_sample:
            raise BadRequest(f"nlist {settings['nlist']} needs {need} training points, more than the "
                             f"{self.c.config.train_sample} a job samples (QINCO_TRAIN_SAMPLE)")
        if n < need:
            raise BadRequest(f"{self.space.label} of collection {self.c.name!r} holds {n} vectors; training needs "
                             f"at least {need}"
                             + (f" (nlist {settings['nlist']} x {MIN_PER_LIST} per list)"
                                if settings.get("nlist") else ""))

    def _job(self, record: dict) -> TrainingJob:
        c = self.c
        return TrainingJob(c.name, self.space.folder / "jobs", c.record.path, record, c.config.training_threads,
                           c.config.encoding_threads,
                           c.config.device, swap=self.swap, failed=self.failed)

    def _launch(self, job: TrainingJob):
        """Start the job's thread (write lock held) and make it the space's job."""
        job.thread = concurrency.start("train", self.c.name, job.run)
        self.space.job = job

    def maybe_train(self):
        """Start a job by itself (write lock held): once a space collecting its first points holds
        `train_after` of them, and again once it has outgrown its model (`grown`), with the
        model's code size and never fewer lists.  After a failed or cancelled job it waits for an
        explicit train request."""
        space, q = self.space, self.space.settings
        if q is None or space.job is not None or space.facts.get("last_error") or space.facts.get("paused"):
            return
        if space.collecting and q["train_after"] and space.index.ntotal >= q["train_after"]:
            request = None
        elif not space.collecting and self.grown():
            sampled = self._sample_size()
            nlist = max(space.index.nlist, q.get("nlist") or auto_nlist(sampled))
            if min_points(nlist) > sampled:
                return
            request = {"nlist": nlist, "bytes": space.model.cfg.M}
        else:
            return
        concurrency.start("autotrain", self.c.name, self._auto_train, request)  # once the caller releases the lock

    def grown(self) -> bool:
        """Whether the space has outgrown its model: a job would now sample `retrain_growth` times
        the points the model trained on, so a new one gets more data and more IVF lists (nlist
        follows the sample: training/policy.py).  Never for a space that trains only on request
        (train_after 0), nor one made before the setting existed (no `retrain_growth`)."""
        space, q = self.space, self.space.settings
        growth = q.get("retrain_growth") or 0
        trained_on = (space.facts.get("model") or {}).get("trained_on")
        if (not isinstance(growth, (int, float)) or growth < MIN_RETRAIN_GROWTH or not q.get("train_after")
                or not trained_on or not space.keeps_originals):  # (a hand-edited collection.json: never)
            return False
        return self._sample_size() >= growth * trained_on

    def _sample_size(self) -> int:
        """The points a job started now would train on."""
        return min(self.space.index.ntotal, self.c.config.train_sample)

    def _auto_train(self, request: dict | None):
        try:
            self.start(request, auto=True)
        except (Conflict, NotFound):
            pass
        except Exception:
            log.exception("%s: automatic training could not start", self.c.name)

    def resume(self):
        """Start again a job that the last run of the server left unfinished."""
        c, record = self.c, self.space.facts.get("job")
        for folder in (self.space.folder / "jobs").glob("*"):  # of jobs that ended (or were never recorded)
            if record is None or folder.name != record["id"]:
                shutil.rmtree(folder, ignore_errors=True)
        if record is not None and self.space.job is None and not c.closing:
            log.info("%s: resuming job %s (%s)", c.name, record["id"], record["kind"])
            with c.locks.write:
                self._launch(self._job(record))

    # ---- ending --------------------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Stop the running job; what served before keeps serving.  False if it swapped first."""
        job = self.space.job
        if job is None:
            raise NotFound(f"{self.space.label} of collection {self.c.name!r} has no training job")
        job.cancel()  # waits for the job's thread: a swap under way either commits or not
        with self.c.locks.write:
            if self.space.job is not job:
                return False  # it swapped before it could be stopped
            self._end(job, None, paused=True)
        return True

    def failed(self, job: TrainingJob, reason: str):
        with self.c.locks.write:
            if self.space.job is job and not self.c.closed:
                self._end(job, reason)

    def _end(self, job: TrainingJob, error: str | None, paused: bool = False):
        """Forget a job that did not swap (write lock held): its record first, then its files.
        A cancel pauses automatic training until the next train request."""
        space, record = self.space, self.space.record
        with self.c.record.transaction():
            record.drop_facts("job")
            if error is not None:
                record.put_fact("last_error", error)
            if paused:
                record.put_fact("paused", True)
        space.facts.pop("job", None)
        if error is not None:
            space.facts["last_error"] = error
        if paused:
            space.facts["paused"] = True
        space.job = None
        shutil.rmtree(job.dir, ignore_errors=True)

    def swap(self, job: TrainingJob, catch_up_rounds: int = 5) -> int:
        """Serve the job's model: its index with every point, then one transaction for the codes
        of every point and the generation.  Writes wait for the last catch-up and that transaction
        (an UPDATE of every row: seconds per million points); searches go on.  Returns the new
        generation."""
        c, space, record = self.c, self.space, self.space.record
        use_threads(c.config.threads)
        model_file, trained, encoded = job.outputs()
        model = load_model(model_file)
        model.seeder()  # its seed encoder (if any) built now, not under the write lock below
        new = QincoSpaceIndex(QincoIndex(model))
        ids = np.fromfile(job.dir / "ids.i64", dtype=np.int64)
        codes = np.fromfile(job.dir / "codes.i32", dtype=np.int32).reshape(len(ids), encoded["width"])
        for i0 in range(0, len(ids), 100_000):
            part = slice(i0, i0 + 100_000)
            new.add(codes[part], ids[part], np.zeros(len(ids[part]), bool))  # a new index: none stored
        seq = encoded["seq"]
        for _ in range(catch_up_rounds):  # writes that came during the encoding, without the lock
            changed, x, seq = record.originals_written_after(seq)
            if len(changed):
                new.add(new.encode(x, space.encoder), changed)
            if len(changed) < 1000 or job.cancelled.is_set():
                break
        with c.locks.write:
            c.check_writable()
            if job.cancelled.is_set():
                raise JobCancelled()
            changed, x, seq = record.originals_written_after(seq, writer=True)
            if len(changed):
                new.add(new.encode(x, space.encoder), changed)
            new.remove(np.setdiff1d(new.ids(), space.index.ids()))  # deleted meanwhile
            if new.ntotal != space.index.ntotal:
                raise RuntimeError(f"the new index holds {new.ntotal} points, the collection {space.index.ntotal}")
            generation = space.generation + 1
            save_model(model, space.model_path(generation), {"training": trained})
            fsync_folder(space.folder)  # the file outlives a power loss before the commit names it
            stored_ids, stored_codes = new.stored_codes()
            figures = {**trained, "generation": generation, "swapped": time.time()}
            with c.record.transaction():
                record.set_codes(stored_ids, stored_codes)
                record.set_generation(generation)
                record.unqueue_all()  # every point now has the new model's codes
                record.drop_facts("job", "last_error")
                record.put_fact("model", figures)
                if not space.settings["keep_originals"]:
                    record.drop_originals()
            with c.locks.index.write():
                space.index, space.model, space.generation, space.tuning = new, model, generation, {}
                space.job = None
            space.facts = {"model": figures}
            space.refiner.pending = 0
            c.snapshots.changed = 0
            space.remove_stale_models()
            shutil.rmtree(job.dir, ignore_errors=True)
        release_free_memory()  # the transaction's rows of every point, freed in the heap's middle
        c.snapshots.start()
        with c.locks.write:
            if not job.cancelled.is_set():  # a cancel that came too late to stop this job stops the next
                self.maybe_train()  # outgrown already (a bulk load that came during this job): the next one
        return generation

    # ---- status --------------------------------------------------------------------------------------
    def status(self) -> dict:
        """Where the space is: phase, job, model, bytes per point (the info's `qinco` block)."""
        c, space = self.c, self.space
        job = space.job  # read once: a swap may clear it meanwhile
        job = job.status() if job is not None else None
        if job is not None:
            phase = "training" if job["phase"] in ("queued", "training") else "encoding"
        else:
            phase = "collecting" if space.collecting else "ready"
        figures = space.facts.get("model", {})
        ratio = None
        if figures.get("val_mse") is not None and figures.get("rq_val_mse"):
            ratio = round(figures["val_mse"] / figures["rq_val_mse"], 4)
        model = None if space.collecting else {
            "generation": space.generation, "val_mse": figures.get("val_mse"), "rq_val_mse": figures.get("rq_val_mse"),
            "mse_vs_rq": ratio, "trained_on": figures.get("trained_on"), "bytes": space.model.cfg.M,
            "nlist": space.model.cfg.nlist}
        q = space.settings or {}
        n = space.index.ntotal
        memory = space.index.memory_per_point
        try:
            disk = c.record.size_on_disk() // max(n, 1)
        except OSError:  # deleted meanwhile
            disk = 0
        return {"phase": phase, "job": job, "model": model,
                "points_encoded": 0 if space.collecting else n,
                "refine_pending": space.refiner.pending,
                "last_swap": figures.get("swapped"), "last_error": space.facts.get("last_error"),
                "train_after": q.get("train_after", 0), "train_minutes": q.get("train_minutes"),
                "keep_originals": bool(q.get("keep_originals")), "originals": n if space.keeps_originals else 0,
                "retrain_growth": q.get("retrain_growth") or 0, "paused": bool(space.facts.get("paused")),
                "bytes_per_point": {"memory": memory, "disk": disk}}
