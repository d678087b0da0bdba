"""A collection: its durable record, its vector spaces (Qdrant's named vectors), its points and
payload indexes, and the parts that run them.  One folder per collection under
<data_dir>/collections/<name>:

  collection.json      name, uuid, and its vector spaces (`vectors`: name, metric, encoder; size and
                       `qinco` settings of a self-training one), written once, atomically
  points.sqlite        the record of truth (engine/record.py)
  snapshot/            the indexes as of a sequence number (engine/snapshots.py)
  model*.safetensors, tuning.json, jobs/   the first vector space's files; vectors/<k>/: space k's
                       (engine/space.py, service/training/)

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

from model.threads import use_threads

from ..errors import BadRequest, NotFound, Unavailable
from ..memory import release_free_memory
from . import reads, search as searching, writes
from .concurrency import CollectionLocks
from .config import CollectionConfig
from .filters import Evaluator, PayloadIndexes, has_id_values
from .ids import INT_ID_RANGE, PointIds, PointSet, UnknownId, canonical_ids, is_int_id
from .lifecycle import Trainer
from .record import Record
from .refine import Refiner
from .snapshots import Snapshots
from .space import VectorSpace, space_metas

log = logging.getLogger("qinco.store")


class Collection:
    """A collection and the parts it composes (guarded by the locks of concurrency.py):

      record           points.sqlite (record.py)
      point_ids        client ids <-> internal ids (ids.py)
      points           the stored points' internal ids (ids.PointSet: a bitmap; written under the index lock)
      spaces           its vector spaces by name (space.py), each with its index, trainer and refiner
      payload_indexes  the field indexes that filters read (filters.py; index lock)
      snapshots        snapshot, recovery, the count of changed points (snapshots.py)
      closing, broken  set under the write lock; read anywhere
    """

    def __init__(self, folder: Path, config: CollectionConfig):
        self.folder, self.config = folder, config
        self.meta = json.loads((folder / "collection.json").read_text())
        self.name = self.meta["name"]
        self.uuid = self.meta.get("uuid")  # identity: a snapshot of another collection of this name is refused
        self.named = bool(self.meta.get("named"))  # created with named vectors (Qdrant's info shows them so)
        use_threads(config.threads)
        self.locks = CollectionLocks()
        metas = space_metas(self.meta)
        self.record = Record(folder / "points.sqlite", self.name, metas)
        self.point_ids = PointIds(self.record.db)
        self.spaces = {m["name"]: VectorSpace(folder, m, k, self.record.space(k)) for k, m in enumerate(metas)}
        self.closing = False
        self.broken: str | None = None  # why writes are refused until a restart (a failed rebuild)
        self.snapshots = Snapshots(self)
        self.recovery = self._recover()
        self.payload_indexes = PayloadIndexes(self.record.declared_payload_indexes())
        self.snapshots.recover_payload_indexes(self.payload_indexes)
        for key in self.payload_indexes.declared:  # the rest built now, not on the first filter
            self.payload_indexes.get(key, self.record.payload_rows)
        for space in self.spaces.values():
            space.trainer = Trainer(self, space)
            space.refiner = Refiner(self, space)

    def _recover(self) -> dict:
        """Every space's index and the point set as of the last commit; what was done."""
        t0 = time.time()
        done = [self.snapshots.recover(space) for space in self.spaces.values()]
        for space, (index, _) in zip(self.spaces.values(), done):
            space.index = index
        self.points = PointSet(self.record.point_ids())
        release_free_memory()  # building the point set leaves its temporaries in the heap: 300 MiB at 10M
        return {"snapshot_seq": max(r["snapshot_seq"] for _, r in done),
                "replayed": sum(r["replayed"] for _, r in done), "seconds": round(time.time() - t0, 3)}

    @property
    def space(self) -> VectorSpace:
        """The unnamed vector's space, or the first named one (the collection's figures in `info`)."""
        return self.spaces.get("") or next(iter(self.spaces.values()))

    def space_named(self, name: str | None) -> VectorSpace:
        """The space of Qdrant's `using` (None: the unnamed vector, "")."""
        try:
            return self.spaces[name or ""]
        except KeyError:
            known = ", ".join(repr(n) for n in self.spaces)
            what = "no unnamed vector (name one with `using`)" if not name else f"no vector named {name!r}"
            raise BadRequest(f"collection {self.name!r} has {what}; its vectors: {known}") from None

    def spaces_named(self, names) -> list[VectorSpace]:
        """The spaces of `with_vector`: True (all), False (none) or a list of names."""
        if names is True:
            return list(self.spaces.values())
        if not names:
            return []
        return [self.space_named(n) for n in dict.fromkeys(names)]

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
        return Evaluator(self.points.ids, field, resolve).ids(f)

    def _selected(self, f) -> list[int]:
        """The ids a filter lets through, chosen under the write lock (held by the caller), so
        that no write slips in between choosing the points and changing them."""
        resolve = self.has_id_resolver(f)
        with self.locks.index.read():
            return self.filter_ids(f, resolve).tolist()

    # ---- reads -------------------------------------------------------------------------------------
    def count(self) -> int:
        return len(self.points)

    def count_filtered(self, f) -> int:
        use_threads(self.config.threads)
        self.record.check_open()
        resolve = self.has_id_resolver(f)
        with self.locks.index.read():
            return len(self.filter_ids(f, resolve))

    def payloads(self, ids) -> dict[int, dict | None]:
        return self.record.payloads(ids)

    def get(self, point_id: int | str, with_vector) -> dict:
        return reads.get(self, point_id, with_vector)

    def vectors_of(self, ids, space: VectorSpace) -> np.ndarray:
        return reads.vectors_of(self, ids, space)

    def records(self, ids, with_payload: bool, with_vector) -> list[dict]:
        return reads.records(self, self.internal_ids(ids), with_payload, with_vector)

    def scroll(self, f, offset: int | str | None, limit: int, with_payload: bool,
               with_vector) -> tuple[list, int | str | None]:
        return reads.scroll(self, f, offset, limit, with_payload, with_vector)

    def search(self, queries, limit: int, params: dict | None, with_payload: bool, with_vector,
               exclude: list[set] | None = None, budget: searching.SearchBudget | None = None,
               filter=None, using: str | None = None) -> list[list[searching.Hit]]:
        """engine/search.py's search on the vector space `using` (None: the unnamed vector)."""
        return searching.search(self, self.space_named(using), queries, limit, params, with_payload, with_vector,
                                exclude, budget, filter)

    # ---- writes ------------------------------------------------------------------------------------
    def upsert(self, ids: list, vectors, payloads: list[dict | None]) -> tuple[int, float]:
        """Points, each with its vectors by space name ({"": [...]} for the unnamed one; or plain
        vectors, an (n, d) array or list, for the unnamed one) and payload,
        replacing the whole point (a vector it had but not given is removed, as in Qdrant).  Encode
        (no lock), commit to SQLite, then insert in memory.  Returns (seq, encode seconds)."""
        return writes.write(self, ids, vectors, payloads)

    def update_vectors(self, ids: list, vectors) -> tuple[int, float]:
        """Set the given vectors of stored points (one missing: NotFound, nothing changed); their
        other vectors and payloads stay."""
        return writes.write(self, ids, vectors, None)

    def delete_vectors(self, ids: list | None, f, names: list[str]) -> tuple[int, int]:
        """Remove the named vectors of the points given by ids (one of them not stored: NotFound,
        nothing changed) or by a filter; the points and their other vectors stay.  Returns (seq,
        how many points)."""
        return writes.delete_vectors(self, ids, f, names)

    def _checked_ids(self, ids: list) -> list:
        try:
            ids = canonical_ids(ids)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if len(set(ids)) != len(ids):
            raise BadRequest("duplicate ids in one batch")
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
                    self.recovery = self._recover()
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
            old = self.payload_indexes.old_payloads(self.record, ids)
            existing = self.record.delete_points(ids)
            unqueued = [space.record.delete_vectors(ids, w.seq) for space in self.spaces.values()]
        for space, n in zip(self.spaces.values(), unqueued):
            space.refiner.pending -= n

        def change():
            self.points.remove(id_array)
            for space in self.spaces.values():
                space.index.remove(id_array)
            self.payload_indexes.delete(ids, old)
        self.apply(change)
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
            self.snapshots.count(len(ids))  # a restart re-indexes the payloads changed since a snapshot
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
            self.record.set_payloads(rows, w.seq)
        old = {i: json.loads(current[i]) if current[i] is not None else None for i in ids} \
            if self.payload_indexes.fields else None
        self.apply(lambda: self.payload_indexes.upsert(ids, new, old))
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
    def start_training(self, request: dict | None = None, model_source: Path | None = None,
                       using: str | None = None) -> dict:
        return self.space_named(using).trainer.start(request, model_source)

    def cancel_training(self, using: str | None = None) -> bool:
        return self.space_named(using).trainer.cancel()

    def snapshot(self) -> int:
        return self.snapshots.write()

    def qinco_status(self, using: str | None = None) -> dict:
        """The training status of a vector space (None: the collection's first, `space`)."""
        return (self.space if using is None else self.space_named(using)).trainer.status()

    def info(self) -> dict:
        """The collection's figures and health (Qdrant's colours); service/http adds Qdrant's shape.
        The top-level figures are those of `space`; `vectors` has every space's."""
        n = self.count()
        vectors = {name: self._space_info(space) for name, space in self.spaces.items()}
        first = vectors[self.space.name]
        if self.broken:
            status = "red"
        elif any(v["qinco"]["job"] is not None or v["qinco"]["refine_pending"] for v in vectors.values()):
            status = "yellow"  # Qdrant: yellow while optimizing
        else:
            status = "grey" if all(space.collecting for space in self.spaces.values()) else "green"
        return {"name": self.name, "status": status, "points_count": n, "named": self.named, "vectors": vectors,
                **{k: first[k] for k in ("dimension", "metric", "bytes_per_vector", "nlist", "encoder", "tuned",
                                          "default_params", "qinco")},
                "payload_schema": self.payload_indexes.schema(), "error": self.broken}

    @staticmethod
    def _space_info(space: VectorSpace) -> dict:
        return {"dimension": space.dimension, "metric": space.metric, "vectors_count": space.index.ntotal,
                "bytes_per_vector": space.index.code_bytes, "nlist": space.index.nlist,
                "encoder": space.encoder_name, "tuned": bool(space.tuning.get("points")),
                "default_params": space.index.default_params(), "qinco": space.trainer.status(),
                "datatype": space.record.file.datatype if space.record.file is not None else None}

    def close(self):
        """Stop the jobs (they resume at the next open), wait for a snapshot in progress, then
        refuse everything."""
        with self.locks.write:  # no job can start after this
            self.closing = True
            jobs = [space.job for space in self.spaces.values() if space.job is not None]
        for space in self.spaces.values():
            space.refiner.wake.set()
        for job in jobs:
            job.cancel()
        with self.locks.snapshot, self.locks.write:
            self.record.close()
