"""A collection: its durable record, its vector space(s), its payload indexes, and the parts that
run them.  One folder per collection under <data_dir>/collections/<name>:

  collection.json      name, uuid, metric, encoder; size and `qinco` settings of a self-training
                       collection (written once, atomically)
  model.safetensors    the model of generation 0; model-G.safetensors: generation G >= 1, trained
                       by the collection itself
  tuning.json          tuned operating points (when created from a tuned index)
  points.sqlite        the record of truth (engine/record.py)
  snapshot/            the index as of a sequence number (engine/snapshots.py)
  jobs/<id>/           a training job's files (service/training/)

A write batch gets one sequence number and is one SQLite transaction: it is acknowledged only
after the commit, then applied in memory.  Everything that can be refused is checked before
the commit; the in-memory change after it cannot fail on the input (see `apply`).
Locks and threads: engine/concurrency.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from model.network import ENCODERS
from model.threads import use_threads

from ..errors import BadRequest, NotFound, Unavailable
from . import reads, search as searching
from .concurrency import CollectionLocks
from .config import CollectionConfig
from .filters import Evaluator, PayloadIndexes, has_id_values
from .ids import INT_ID_RANGE, PointIds, UnknownId, canonical_ids, is_int_id
from .lifecycle import Trainer
from .record import Record
from .refine import Refiner
from .snapshots import Snapshots
from .space import VectorSpace

log = logging.getLogger("qinco.store")


class Collection:
    """A collection and the parts it composes (guarded by the locks of concurrency.py):

      record           points.sqlite (record.py)
      point_ids        client ids <-> internal ids (ids.py)
      spaces           its vector spaces by name; `space` is the unnamed one (space.py)
      payload_indexes  the field indexes that filters read (filters.py; index lock)
      snapshots        snapshot, recovery, the count of changed points (snapshots.py)
      trainer          the space's training jobs and swap (lifecycle.py)
      refiner          fast ingest's background re-encoding (refine.py)
      closing, broken  set under the write lock; read anywhere
    """

    def __init__(self, folder: Path, config: CollectionConfig):
        self.folder, self.config = folder, config
        self.meta = json.loads((folder / "collection.json").read_text())
        self.name = self.meta["name"]
        self.uuid = self.meta.get("uuid")  # identity: a snapshot of another collection of this name is refused
        use_threads(config.threads)
        self.locks = CollectionLocks()
        self.record = Record(folder / "points.sqlite", self.name)
        self.point_ids = PointIds(self.record.db)
        # One unnamed vector space today; Qdrant's named vectors add more, each with its own parts.
        self.spaces = {"": VectorSpace(folder, self.meta, self.record.generation(), self.record.facts())}
        self.closing = False
        self.broken: str | None = None  # why writes are refused until a restart (a failed rebuild)
        self.snapshots = Snapshots(self)
        self.space.index, self.recovery = self.snapshots.recover()
        self.payload_indexes = PayloadIndexes(self.record.declared_payload_indexes())
        for key in self.payload_indexes.declared:  # built now, not on the first filter
            self.payload_indexes.get(key, self.record.payload_rows)
        self.trainer = Trainer(self, self.space)
        self.refiner = Refiner(self, self.space)

    @property
    def space(self) -> VectorSpace:
        return self.spaces[""]

    @property
    def dimension(self) -> int:
        return self.space.dimension

    @property
    def closed(self) -> bool:
        return self.record.closed

    def check_writable(self):
        self.record.check_open()
        if self.broken:
            raise Unavailable(self.broken)

    # ---- ids and filters -------------------------------------------------------------------------
    def internal_ids(self, ids, strict: bool = False) -> list[int]:
        """Internal ids of client ids (integers or UUIDs, see ids.py), in order; an unknown UUID is
        NotFound (strict) or left out."""
        ids = canonical_ids(ids)
        if all(isinstance(i, int) for i in ids):
            return ids
        try:
            with self.record.reading() as db:
                return self.point_ids.internal(db, ids, strict)
        except UnknownId as e:
            raise NotFound(f"point {e.args[0]} not found in collection {self.name!r}") from None

    def has_id_resolver(self, f):
        """has_id's client ids -> internal ids, the UUIDs looked up now: before the index lock, which
        filter_ids then holds without waiting on SQLite."""
        uuids = [i for i in has_id_values(f) if isinstance(i, str)] if f is not None else []
        if not uuids:
            return lambda ids: ids
        with self.record.reading() as db:
            found = self.point_ids.lookup(db, canonical_ids(uuids))
        return lambda ids: [found.get(i, -1) if isinstance(i, str) else i for i in ids]

    def filter_ids(self, f, resolve) -> np.ndarray:
        """Sorted ids of the stored points that a filter lets through (index read lock held);
        resolve: from has_id_resolver(f)."""
        def field(key: str):
            return self.payload_indexes.get(key, self.record.payload_rows)
        return Evaluator(self.space.index.ids(), field, resolve).ids(f)

    def _selected(self, f) -> list[int]:
        """The ids a filter lets through, chosen under the write lock (held by the caller), so
        that no write slips in between choosing the points and changing them."""
        resolve = self.has_id_resolver(f)
        with self.locks.index.read():
            return self.filter_ids(f, resolve).tolist()

    # ---- reads -------------------------------------------------------------------------------------
    def count(self) -> int:
        with self.locks.index.read():  # an upsert or refinement removes, then adds: not mid-way
            return self.space.index.ntotal

    def count_filtered(self, f) -> int:
        use_threads(self.config.threads)
        self.record.check_open()
        resolve = self.has_id_resolver(f)
        with self.locks.index.read():
            return len(self.filter_ids(f, resolve))

    def payloads(self, ids) -> dict[int, dict | None]:
        return self.record.payloads(ids)

    def get(self, point_id: int | str, with_vector: bool) -> dict:
        return reads.get(self, point_id, with_vector)

    def stored_vectors(self, ids) -> tuple[np.ndarray, np.ndarray]:
        return reads.stored_vectors(self, ids)

    def vectors_of(self, ids) -> np.ndarray:
        return reads.vectors_of(self, ids)

    def records(self, ids, with_payload: bool, with_vector: bool) -> list[dict]:
        return reads.records(self, self.internal_ids(ids), with_payload, with_vector)

    def scroll(self, f, offset: int | str | None, limit: int, with_payload: bool,
               with_vector: bool) -> tuple[list, int | str | None]:
        return reads.scroll(self, f, offset, limit, with_payload, with_vector)

    def search(self, queries, limit: int, params: dict | None, with_payload: bool, with_vector: bool,
               exclude: list[set] | None = None, budget: searching.SearchBudget | None = None,
               filter=None) -> list[list[searching.Hit]]:
        """engine/search.py's search on this collection (its unnamed vector space)."""
        return searching.search(self, queries, limit, params, with_payload, with_vector, exclude, budget, filter)

    # ---- writes ------------------------------------------------------------------------------------
    def upsert(self, ids: list, vectors, payloads: list[dict | None]) -> tuple[int, float]:
        """Encode (no lock), commit to SQLite, then insert in memory.  Returns (seq, encode seconds)."""
        use_threads(self.config.threads)
        ids = self._checked_ids(ids, len(payloads))
        space = self.space
        x = space.prepare(vectors)
        index = space.index
        fast = self.refiner.acknowledges_fast()
        encoder = ENCODERS["fast"] if fast else space.encoder
        t0 = time.perf_counter()
        encoded = index.encode(x, encoder)
        encode_seconds = time.perf_counter() - t0
        try:
            if len(x) != len(ids):
                raise ValueError("ids and vectors do not match")
            payload_json = [None if p is None else json.dumps(p, allow_nan=False) for p in payloads]
        except (ValueError, TypeError, OverflowError) as e:
            raise BadRequest(f"cannot store this batch: {e}") from None
        with self.locks.write:
            self.check_writable()
            if space.index.model is not index.model:  # a new model was swapped in meanwhile: its codes
                encoded = space.index.encode(x, encoder)
            index = space.index
            refine = fast and not index.exact
            uuids_before = self.point_ids.count
            try:
                with self.record.write() as w:
                    ids, _ = self.point_ids.assign(self.record.db, ids)
                    self.record.put_points(ids, index.stored_form(encoded), payload_json, w.seq)
                    if space.keeps_originals:
                        self.record.put_originals(ids, x)
                    requeued = self.record.unqueue(ids)  # rewritten: a queue row of its old vector goes
                    if refine:
                        self.record.queue(ids, x, w.seq)
            except BaseException:
                self.point_ids.restore(uuids_before)  # rolled back: so are its new UUIDs
                raise
            self.refiner.pending += (len(ids) if refine else 0) - requeued
            id_array = np.array(ids, dtype=np.int64)
            self.apply(lambda: (space.index.add(encoded, id_array), self.payload_indexes.upsert(ids, payloads)))
            self.trainer.maybe_train()
            if refine:
                self.refiner.wake.set()
            self.snapshots.count(len(ids))
        return w.seq, encode_seconds

    def _checked_ids(self, ids: list, n_payloads: int) -> list:
        try:
            ids = canonical_ids(ids)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if len(set(ids)) != len(ids):
            raise BadRequest("duplicate ids in one batch")
        if n_payloads != len(ids):
            raise BadRequest(f"{len(ids)} ids but {n_payloads} payloads")
        if any(isinstance(i, int) and not is_int_id(i) for i in ids):
            raise BadRequest(f"integer point ids must be in {INT_ID_RANGE}; larger ones are kept for UUIDs")
        return ids

    def apply(self, change):
        """Apply a committed write to the in-memory index (write lock held).

        Should that fail anyway, the index would miss a committed row that the next
        snapshot then covers: rebuild it from the database instead, and refuse writes
        (until a restart) if even that fails.
        """
        try:
            with self.locks.index.write():
                change()
        except Exception as e:
            log.exception("%s: in-memory write failed after its commit; rebuilding from the database", self.name)
            try:
                with self.locks.index.write():
                    self.space.index, self.recovery = self.snapshots.recover()
                    self.payload_indexes = PayloadIndexes(self.payload_indexes.declared)
            except Exception as e2:
                self.broken = (f"a write was committed but the in-memory index could not be rebuilt after it "
                               f"({e2}); restart the service to serve it")
                log.exception("%s: rebuild failed", self.name)
                raise Unavailable(self.broken) from e
            self.snapshots.changed = 0

    def delete(self, ids: list) -> tuple[int, int]:
        """Points by client id; returns (seq, number of points that existed)."""
        use_threads(self.config.threads)
        with self.locks.write:
            self.check_writable()
            seq, existing = self._delete_locked(self.internal_ids(ids))
            self.snapshots.count(len(ids))
        return seq, existing

    def _delete_locked(self, ids) -> tuple[int, int]:
        """One durable delete (write lock held)."""
        ids = sorted(set(int(i) for i in ids))
        id_array = np.array(ids, dtype=np.int64)
        with self.record.write() as w:
            existing = self.record.delete_points(ids, w.seq)
            unqueued = self.record.unqueue(ids)
        self.refiner.pending -= unqueued
        self.apply(lambda: (self.space.index.remove(id_array), self.payload_indexes.delete(ids)))
        return w.seq, existing

    def delete_filtered(self, f, chunk: int = 10_000) -> tuple[int, int]:
        """Delete the points a filter lets through, in durable writes of `chunk` points;
        returns (seq, how many)."""
        use_threads(self.config.threads)
        with self.locks.write:
            self.check_writable()
            ids = self._selected(f)
            seq, existed = self.record.last_seq(), 0
            for i0 in range(0, len(ids), chunk):
                seq, n = self._delete_locked(ids[i0:i0 + chunk])
                existed += n
            self.snapshots.count(existed)
        return seq, existed

    def update_payloads(self, ids: list | None, f, change, chunk: int = 10_000) -> tuple[int, int]:
        """Apply change(payload) -> payload to the points given by ids (one of them not stored:
        NotFound, nothing changed) or by a filter, in durable writes of `chunk` points."""
        use_threads(self.config.threads)
        with self.locks.write:
            self.check_writable()
            ids = list(dict.fromkeys(self._selected(f) if f is not None else self.internal_ids(ids, strict=True)))
            seq = self.record.last_seq()
            for i0 in range(0, len(ids), chunk):
                seq = self._update_payload_chunk(ids[i0:i0 + chunk], change, strict=f is None)
        return seq, len(ids)

    def _update_payload_chunk(self, ids: list[int], change, strict: bool) -> int:
        with self.record.write() as w:
            current = self.record.payloads_to_change(ids)
            missing = [i for i in ids if i not in current]
            if missing and strict:
                raise NotFound(f"no point with id {self.point_ids.external(missing[0])} in collection {self.name!r}")
            ids = [i for i in ids if i in current]
            new = [change(json.loads(current[i]) if current[i] is not None else {}) for i in ids]
            try:
                rows = [(None if p is None else json.dumps(p, allow_nan=False), i) for i, p in zip(ids, new)]
            except (ValueError, TypeError) as e:
                raise BadRequest(f"cannot store this payload: {e}") from None
            self.record.set_payloads(rows)
        self.apply(lambda: self.payload_indexes.upsert(ids, new))
        return w.seq

    def create_field_index(self, key: str, schema: str) -> int:
        """Declare a payload index (durable; built now, kept up to date by every write)."""
        use_threads(self.config.threads)
        with self.locks.write:
            self.check_writable()
            with self.record.transaction():
                self.record.declare_payload_index(key, schema)
            self.payload_indexes.declared[key] = schema
            seq = self.record.last_seq()
        with self.locks.index.read():
            self.payload_indexes.get(key, self.record.payload_rows)
        return seq

    def delete_field_index(self, key: str) -> int:
        with self.locks.write:
            self.check_writable()
            if key not in self.payload_indexes.declared:
                raise NotFound(f"collection {self.name!r} has no payload index on {key!r}")
            with self.record.transaction():
                self.record.drop_payload_index(key)
            with self.locks.index.write():
                self.payload_indexes.drop(key)
            return self.record.last_seq()

    # ---- training, snapshots, status, close ----------------------------------------------------------
    def start_training(self, request: dict | None = None, model_source: Path | None = None) -> dict:
        return self.trainer.start(request, model_source)

    def cancel_training(self) -> bool:
        return self.trainer.cancel()

    def snapshot(self) -> int:
        return self.snapshots.write()

    def qinco_status(self) -> dict:
        return self.trainer.status()

    def info(self) -> dict:
        """The collection's figures and health (Qdrant's colours); service/http adds Qdrant's shape."""
        space = self.space
        n = self.count()
        qinco = self.qinco_status()
        if self.broken:
            status = "red"
        elif qinco["job"] is not None or qinco["refine_pending"]:  # Qdrant: yellow while optimizing
            status = "yellow"
        else:
            status = "grey" if space.collecting else "green"
        return {"name": self.name, "status": status, "dimension": space.dimension, "metric": space.metric,
                "points_count": n, "bytes_per_vector": space.index.code_bytes, "nlist": space.index.nlist,
                "encoder": space.encoder_name, "tuned": bool(space.tuning.get("points")),
                "default_params": space.index.default_params(), "payload_schema": self.payload_indexes.schema(),
                "qinco": qinco, "error": self.broken}

    def close(self):
        """Stop a job (it resumes at the next open), wait for a snapshot in progress, then refuse
        everything."""
        with self.locks.write:  # no job can start after this
            self.closing = True
            job = self.space.job
        self.refiner.wake.set()
        if job is not None:
            job.cancel()
        with self.locks.snapshot, self.locks.write:
            self.record.close()
