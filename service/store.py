"""Durable collections: SQLite is the record of truth, the faiss index is rebuilt from it.

One folder per collection under <data_dir>/collections/<name>:
  collection.json    name, metric, encoder; size and QINCo settings of a self-training
                     collection (written once, atomically)
  model.safetensors  the QINCo model with its fixed tables (model generation 0)
  model-G.safetensors  the model of generation G >= 1, trained by the collection itself
  tuning.json        tuned operating points (when created from a tuned index)
  points.sqlite      id -> codes (IVF list first), payload, seq; deleted ids with their seq;
                     original vectors (self-training collections); the model generation and
                     the training job's record; the points to refine (fast ingest)
  snapshot/          the faiss index as of sequence number S, written atomically
  jobs/<id>/         a training job's files (service/jobs.py)

A self-training collection (created by size and distance) serves exact search over its
original vectors until its first model exists, then QINCo; a job trains a new model in the
background and `swap` switches to it in one transaction (codes of every point and the
generation number together), so a crash leaves the old model or the new, never a mix.

A write batch gets one sequence number and is one SQLite transaction
(WAL, synchronous=FULL): it is acknowledged only after the commit, and a crash
leaves either all of it or none.  On open, the snapshot is loaded and every id
changed after S is re-applied from SQLite; without a snapshot the index is
rebuilt from all rows.  Codes are stored, so recovery never re-encodes.

Fast ingest: an upsert is encoded with the `fast` encoder and acknowledged; its vector waits
in the `refine` table (same transaction) until a background thread re-encodes it with the
collection's encoder and commits the better codes as a new write, unless the point was
rewritten or deleted meanwhile.  A swap re-encodes every point and empties the queue.

Locks: encoding runs outside every lock; `write_lock` orders writers (SQLite
commit, then the in-memory insert); `index_lock` is a readers-writer lock, so
searches run in parallel and wait only for in-memory inserts.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from model.index import ExactIndex, QincoIndex, SearchParams
from model.io import atomic_write, load_model, save_model
from model.network import ENCODERS, check_vectors, encode, split_codes
from model.threads import background_thread, use_threads

from .filters import Evaluator, PayloadIndexes, has_id_values
from .ids import UUID_BASE, PointIds, UnknownId, canonical
from .jobs import JobCancelled, TrainingJob
from .worker import MIN_PER_LIST, NICE, min_points

log = logging.getLogger("qinco.store")


class NotFound(KeyError):
    pass


class Conflict(ValueError):
    pass


class BadRequest(ValueError):
    pass


DISTANCES = {"l2": "Euclid", "cosine": "Cosine"}  # Qdrant's names of the metrics


class Unavailable(RuntimeError):
    """A collection that cannot serve right now (it failed to open or to apply a write)."""


MAX_CANDIDATES = 2_000_000  # queries x max(limit, nshort) in one search call: bounds its memory
MAX_VECTOR_VALUES = 20_000_000  # numbers of the vectors returned by one search call (with_vector)
MAX_RESCORE = 10_000  # candidates re-ranked with their originals in one query
EXACT_SHORTLIST = 1000  # candidates re-ranked by an `exact` search
LIGHT_SEARCH_MACS = 12_000_000  # a lone search this cheap runs in the event loop (~0.3-0.5 ms of one core)
LIGHT_SEARCH_LIMIT = 100  # results (limit + offset) of such a search: payloads are read in the loop too
HNSW_NEIGHBOURS = 64  # distances per HNSW node visited (faiss's HNSW32: 64 links on layer 0)


class SearchBudget:
    """What one request may ask of the searches it makes: shortlist candidates (queries x
    max(limit, nshort)) and numbers of returned vectors.  Shared by the groups of a batch."""

    def __init__(self, candidates: int = MAX_CANDIDATES, vector_values: int = MAX_VECTOR_VALUES):
        self.candidates, self.vector_values = candidates, vector_values
        self.max_candidates = candidates

    def take(self, nq: int, limit: int, nshort: int, with_vector: bool, d: int):
        candidates = nq * max(limit, nshort)
        if candidates > self.candidates:
            raise BadRequest(f"this request asks for more than {self.max_candidates} search candidates (queries x "
                             f"max(limit, nshort)): send fewer queries or a smaller nshort")
        values = nq * limit * d if with_vector else 0
        if values > self.vector_values:
            raise BadRequest(f"this request would return more than {MAX_VECTOR_VALUES} vector values: ask for "
                             f"fewer results or without with_vector")
        self.candidates -= candidates
        self.vector_values -= values


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds new readers back."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


SCHEMA = """
CREATE TABLE IF NOT EXISTS points (id INTEGER PRIMARY KEY, codes BLOB NOT NULL, payload TEXT, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS points_seq ON points(seq);
CREATE TABLE IF NOT EXISTS deleted (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS payload_indexes (field TEXT PRIMARY KEY, schema TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS originals (id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refine (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS refine_order ON refine(seq, id);
INSERT OR IGNORE INTO meta VALUES ('seq', 0);
INSERT OR IGNORE INTO meta VALUES ('generation', 0);
"""


def fsync_folder(folder: Path):
    """Make renames and new files in a folder durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def select_by_ids(db: sqlite3.Connection, table: str, column: str, ids) -> list[tuple]:
    """(id, column) rows of `table` for `ids` (absent ones skipped), 900 ids a query (SQLite's
    bound-parameter limit)."""
    ids = [int(i) for i in ids]
    out = []
    for i0 in range(0, len(ids), 900):
        chunk = ids[i0:i0 + 900]
        out += db.execute(f"SELECT id, {column} FROM {table} WHERE id IN ({','.join('?' * len(chunk))})",
                          chunk).fetchall()
    return out


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only kill -9
    return conn


@dataclass
class Hit:
    id: int | str  # the client's id (an integer or a UUID)
    score: float
    payload: dict | None = None
    vector: list[float] | None = None


REFINE_BATCH = 256  # points re-encoded per background commit
REFINE_QUEUE_BYTES = 1 << 30  # past this many queued vector bytes, upserts wait for the better codes


class Collection:
    def __init__(self, folder: Path, snapshot_every: int = 50_000, threads: int = 0, train_threads: int = 1,
                 train_sample: int = 100_000, fast_ingest: bool = True):
        self.folder = folder
        self.meta = json.loads((folder / "collection.json").read_text())
        self.name = self.meta["name"]
        self.uuid = self.meta.get("uuid")  # identity: a snapshot of another collection of this name is refused
        self.metric = self.meta["metric"]
        self.encoder = ENCODERS[self.meta["encoder"]]
        self.qinco = self.meta.get("qinco")  # settings of a self-training collection; None: created from a model
        self.snapshot_every = snapshot_every
        self.threads, self.train_threads, self.train_sample = threads, train_threads, train_sample
        self.fast_ingest = fast_ingest and self.meta["encoder"] != "fast"
        use_threads(threads)
        self.write_lock = threading.Lock()
        self.index_lock = ReadWriteLock()
        self.db = connect(folder / "points.sqlite")
        self.db.executescript(SCHEMA)
        self.point_ids = PointIds(self.db)
        self.generation = self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]
        path = self._model_path(self.generation)
        if self.qinco is not None and not path.exists() and self.generation == 0:
            self.model = None  # collecting: exact search over the originals
        else:
            self.model = load_model(path)
        self._remove_stale_models()  # only once the current one has loaded
        tuning_path = folder / "tuning.json"
        self.tuning = json.loads(tuning_path.read_text()) if tuning_path.exists() and self.generation == 0 else {}
        self._local = threading.local()
        self.closed = self.closing = False
        self.broken: str | None = None  # why writes are refused until a restart (a failed rebuild)
        self.job: TrainingJob | None = None
        self.state = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM state")}
        self.index, self.recovery = self._recover()
        self.payload_indexes = PayloadIndexes(dict(self.db.execute("SELECT field, schema FROM payload_indexes")))
        for key in self.payload_indexes.declared:  # built now, not on the first filter
            self.payload_indexes.get(key, self._payload_rows)
        self.snapshot_seq = self.recovery["snapshot_seq"]
        self.changed_since_snapshot = 0
        self._snapshotting = threading.Lock()
        self._refine_wake = threading.Event()
        self.refine_pending = self.db.execute("SELECT count(*) FROM refine").fetchone()[0]  # under write_lock
        if self.fast_ingest or self.refine_pending:  # a queue left by a run with fast ingest drains too
            threading.Thread(target=self._refine_loop, daemon=True, name=f"refine-{self.name}").start()

    # ---- recovery and snapshots -------------------------------------------------------
    def _recover(self) -> tuple[QincoIndex, dict]:
        """The index as of the last commit: the snapshot, then every id changed after it.

        Returns it and what was done: {"snapshot_seq", "replayed" (ids changed after it), "seconds"}.
        """
        t0 = time.time()
        if self.model is None:
            return self._recover_originals(t0)
        model, tuning = self.model, self.tuning
        index, seq = QincoIndex(model, tuning=tuning), 0
        snap = self.folder / "snapshot"
        if (snap / "snapshot.json").exists():
            try:
                info = json.loads((snap / "snapshot.json").read_text())
                if info.get("collection_uuid") != self.uuid:
                    raise ValueError(f"it belongs to another collection (uuid {info.get('collection_uuid')})")
                if info.get("generation", 0) != self.generation:
                    raise ValueError(f"it holds the codes of model generation {info.get('generation', 0)}")
                faiss_index = faiss.read_index(str(snap / "index.faiss"))
                if faiss_index.ntotal != info["ntotal"] or faiss_index.d != model.cfg.d:
                    raise ValueError("snapshot does not match its manifest")
                if int(info["seq"]) > self.last_seq():
                    raise ValueError(f"snapshot seq {info['seq']} is ahead of the database")
                index, seq = QincoIndex(model, faiss_index, tuning), int(info["seq"])
            except (ValueError, RuntimeError, KeyError, TypeError, json.JSONDecodeError) as e:
                log.warning("%s: ignoring unusable snapshot (%s); rebuilding from the database", self.folder, e)
        changed = [r[0] for r in self.db.execute(
            "SELECT id FROM points WHERE seq > ? UNION SELECT id FROM deleted WHERE seq > ?", (seq, seq))]
        if changed and index.ntotal:
            index.remove(np.array(changed, dtype=np.int64))
        rows = self.db.execute("SELECT id, codes FROM points WHERE seq > ? ORDER BY id", (seq,))
        while batch := rows.fetchmany(50_000):
            ids = np.array([r[0] for r in batch], dtype=np.int64)
            codes = np.frombuffer(b"".join(r[1] for r in batch), dtype=np.int32).reshape(len(batch), -1)
            index.add_codes(codes, ids)
        log.info("%s: %d points ready in %.1fs (snapshot seq %d, %d changed after it)",
                 self.name, index.ntotal, time.time() - t0, seq, len(changed))
        return index, {"snapshot_seq": seq, "replayed": len(changed), "seconds": round(time.time() - t0, 3)}

    def _recover_originals(self, t0: float) -> tuple[ExactIndex, dict]:
        """Before the first model: every point's original vector, searched exactly."""
        index = ExactIndex(self.meta["size"])
        rows = self.db.execute("SELECT id, vector FROM originals ORDER BY id")
        while batch := rows.fetchmany(50_000):
            ids = np.array([r[0] for r in batch], dtype=np.int64)
            index.add_vectors(np.frombuffer(b"".join(r[1] for r in batch), dtype=np.float32).reshape(len(batch), -1), ids)
        log.info("%s: %d original vectors ready in %.1fs (no model yet: exact search)",
                 self.name, index.ntotal, time.time() - t0)
        return index, {"snapshot_seq": 0, "replayed": index.ntotal, "seconds": round(time.time() - t0, 3)}

    def _model_path(self, generation: int) -> Path:
        return self.folder / ("model.safetensors" if generation == 0 else f"model-{generation}.safetensors")

    def _remove_stale_models(self):
        """Model files of other generations: superseded ones, or a swap that did not commit."""
        keep = self._model_path(self.generation)
        for path in [self.folder / "model.safetensors", *self.folder.glob("model-*.safetensors")]:
            if path != keep:
                path.unlink(missing_ok=True)

    def last_seq(self) -> int:
        return self.db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0]

    def snapshot(self) -> int:
        """Write the index as of the current sequence number; returns it.

        `close` waits for a snapshot in progress, so none can land in the folder of a
        collection deleted (and perhaps created again) meanwhile.
        """
        with self._snapshotting:
            with self.write_lock:  # no write between reading seq and copying the index
                self._check_writable()  # a broken index must not become the record
                seq = self.last_seq()
                if self.model is None:  # the originals in SQLite are the whole state: nothing to replay
                    self.db.execute("DELETE FROM deleted WHERE seq <= ?", (seq,))
                    return seq
                blob = faiss.serialize_index(self.index.index)
                ntotal, generation = self.index.ntotal, self.generation
            snap = self.folder / "snapshot"
            tmp = self.folder / ".snapshot.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            atomic_write(tmp / "index.faiss", lambda f: f.write(blob.tobytes()))
            manifest = {"seq": seq, "ntotal": ntotal, "collection_uuid": self.uuid, "generation": generation}
            atomic_write(tmp / "snapshot.json", lambda f: f.write(json.dumps(manifest).encode()))
            old = self.folder / ".snapshot.old"
            shutil.rmtree(old, ignore_errors=True)
            if snap.exists():
                os.replace(snap, old)
            os.replace(tmp, snap)
            shutil.rmtree(old, ignore_errors=True)
            fsync_folder(self.folder)
            with self.write_lock:
                self.db.execute("DELETE FROM deleted WHERE seq <= ?", (seq,))
            self.snapshot_seq = seq
            return seq

    def _maybe_snapshot(self, changed: int):
        self.changed_since_snapshot += changed
        if self.changed_since_snapshot >= self.snapshot_every and not self._snapshotting.locked():
            self.changed_since_snapshot = 0
            threading.Thread(target=self._snapshot_quietly, daemon=True).start()

    def _snapshot_quietly(self):
        use_threads(self.threads)
        try:
            if not self.closed:
                self.snapshot()
        except NotFound:  # deleted meanwhile
            pass
        except Exception:  # a failed snapshot loses nothing: SQLite still has every row
            log.exception("%s: snapshot failed", self.name)

    # ---- reads ---------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.folder / "points.sqlite")
        return conn

    @contextmanager
    def _reading(self):
        """Reads of SQLite outside the write lock: a collection deleted meanwhile (its folder
        gone, or a new collection of the same name in it) answers NotFound, never another
        collection's rows or a 500."""
        self._check_open()
        try:
            yield self._reader()
        except sqlite3.Error:
            self._check_open()
            raise
        self._check_open()

    @property
    def dimension(self) -> int:
        return self.index.d

    def count(self) -> int:
        with self.index_lock.read():  # an upsert or refinement removes, then adds: not mid-way
            return self.index.ntotal

    def prepare(self, vectors) -> np.ndarray:
        try:
            x = check_vectors(vectors, self.dimension)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if self.metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if (norms == 0).any():
                raise BadRequest("cosine collections cannot hold or search the zero vector")
            x = x / norms
        return x

    def _payload_rows(self):
        """(id, payload) of every stored point, read in one pass."""
        with self._reading() as db:
            rows = db.execute("SELECT id, payload FROM points").fetchall()
        for i, payload in rows:
            yield i, json.loads(payload) if payload is not None else None

    def _internal(self, ids, strict: bool = False) -> list[int]:
        """Internal ids of client ids (integers or UUIDs, see service/ids.py), in order; an unknown
        UUID is NotFound (strict) or left out."""
        ids = canonical(ids)
        if all(isinstance(i, int) for i in ids):
            return ids
        try:
            with self._reading() as db:
                return self.point_ids.internal(db, ids, strict)
        except UnknownId as e:
            raise NotFound(f"point {e.args[0]} not found in collection {self.name!r}") from None

    def has_id_resolver(self, f):
        """has_id's client ids -> internal ids, the UUIDs looked up now: before the index lock, which
        filter_ids then holds without waiting on SQLite."""
        uuids = [i for i in has_id_values(f) if isinstance(i, str)] if f is not None else []
        if not uuids:
            return lambda ids: ids
        with self._reading() as db:
            found = self.point_ids.lookup(db, canonical(uuids))
        return lambda ids: [found.get(i, -1) if isinstance(i, str) else i for i in ids]

    def filter_ids(self, f, resolve) -> np.ndarray:
        """Sorted ids of the stored points that a filter lets through (index read lock held);
        resolve: from has_id_resolver(f)."""
        evaluator = Evaluator(self.index.ids(), lambda key: self.payload_indexes.get(key, self._payload_rows), resolve)
        return evaluator.ids(f)

    def count_filtered(self, f) -> int:
        use_threads(self.threads)
        self._check_open()
        resolve = self.has_id_resolver(f)
        with self.index_lock.read():
            return len(self.filter_ids(f, resolve))

    def payloads(self, ids) -> dict[int, dict | None]:
        with self._reading() as db:
            rows = select_by_ids(db, "points", "payload", ids)
        return {i: json.loads(p) if p is not None else None for i, p in rows}

    def get(self, point_id: int | str, with_vector: bool) -> dict:
        point_id = canonical([point_id])[0]
        internal = self._internal([point_id], strict=True)[0]
        with self._reading() as db:
            row = db.execute("SELECT payload FROM points WHERE id = ?", (internal,)).fetchone()
        if row is None:
            raise NotFound(f"point {point_id} not found in collection {self.name!r}")
        out = {"id": point_id, "payload": json.loads(row[0]) if row[0] is not None else None}
        if with_vector:
            out["vector"] = self.vectors_of([point_id])[0].tolist()
        return out

    def stored_vectors(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of stored points (internal ids) (n, d) and a mask of those found: the originals (exact)
        where the collection keeps them, otherwise the model's decoding (decoded together).

        The source follows the index in service, read under its lock: before a model, the exact
        index holds the originals; with one, originals kept are removed only with their point
        (a swap with keep_originals false deletes them before the new index serves)."""
        ids = [int(i) for i in ids]
        with self.index_lock.read():
            index = self.index
            if index.model is None or not (self.qinco and self.qinco["keep_originals"]):
                return index.reconstruct_many(ids)
        originals = self.originals(ids)
        present = np.array([i in originals for i in ids], dtype=bool)
        vectors = np.zeros((len(ids), self.dimension), dtype=np.float32)
        if present.any():
            vectors[present] = np.stack([originals[i] for i in ids if i in originals])
        return vectors, present

    def vectors_of(self, ids) -> np.ndarray:
        """stored_vectors of points (client ids) that must exist (NotFound names the first missing one)."""
        vectors, present = self.stored_vectors(self._internal(ids, strict=True))
        if not present.all():
            raise NotFound(f"point {list(ids)[int(np.argmin(present))]} not found in collection {self.name!r}")
        return vectors

    def search(self, queries, limit: int, params: dict | None, with_payload: bool, with_vector: bool,
               exclude: list[set[int]] | None = None, budget: SearchBudget | None = None,
               filter=None) -> list[list[Hit]]:
        """Nearest stored points of each query; `filter` (schemas.Filter) restricts them.

        params: nprobe, ef_search, nshort, target_recall, exact, rescore, oversampling.  Before its
        first model a collection searches its originals exactly and ignores them."""
        use_threads(self.threads)
        x = self.prepare(queries)
        params = params or {}
        exclude = [set(self._internal(list(e))) for e in exclude] if exclude else None
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        # Qdrant ignores quantization settings that do not apply: so does rescore without originals.
        rescore = bool(params.get("rescore")) and self._has_originals()
        resolve = self.has_id_resolver(filter)
        try:
            with self.index_lock.read():  # one index throughout, even if a swap replaces it meanwhile
                index = self.index
                rescore = rescore and index.model is not None  # exact already without a model
                k = limit + extra
                if rescore:  # Qdrant's oversampling: more candidates, re-ranked with the originals
                    k = min(MAX_RESCORE, math.ceil(k * (params.get("oversampling") or 1.0)))
                sp = self._search_params(index, params)
                budget = budget or SearchBudget()
                budget.take(len(x), k, sp.nshort if sp else 0, with_vector, self.dimension)
                if rescore:  # the originals read back count as returned vectors
                    budget.take(len(x), k, 0, True, self.dimension)
                allowed = self.filter_ids(filter, resolve) if filter is not None else None
                D, I = index.search(x, k, sp, allowed_ids=allowed)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if rescore:
            D, I = self._rescore(x, D, I)
        if not np.isfinite(D).all():  # float32 overflow: a query far outside the model's range
            raise BadRequest("the query vector's values are too large for this collection's model")
        payloads = self.payloads({int(i) for i in I.ravel()}) if with_payload else {}
        vectors = {}
        if with_vector:
            found = np.unique(I[:, :limit + extra][I[:, :limit + extra] >= 0])  # not every rescore candidate
            stored, present = self.stored_vectors(found)
            vectors = {int(i): v for i, v, ok in zip(found, stored, present) if ok}
        results = []
        cosine = self.metric == "cosine"
        for q in range(len(x)):
            hits = []
            for dist, i in zip(D[q].tolist(), I[q].tolist()):  # Python floats and ints: no numpy scalars
                if i < 0 or (exclude and i in exclude[q]):
                    continue
                if (with_payload and i not in payloads) or (with_vector and i not in vectors):
                    continue  # deleted since the search: its row is gone
                # Qdrant's scores: cosine similarity, or the Euclidean distance (not its square)
                score = 1 - dist / 2 if cosine else math.sqrt(max(dist, 0.0))
                vector = vectors[i].tolist() if with_vector else None
                hits.append(Hit(self.point_ids.external(i), score, payloads.get(i) if with_payload else None, vector))
                if len(hits) == limit:
                    break
            results.append(hits)
        return results

    def is_light_search(self, params: dict | None, limit: int) -> bool:
        """Whether one unfiltered query with these options costs at most LIGHT_SEARCH_MACS
        (a fraction of a millisecond): the service runs such a search in the event loop when
        it is the only request, where a thread hop would cost more than the search.

        Counted: the HNSW walk, a table per probed list, the codes scanned (lists of average
        size) and the neural decodes.  Not light: no model yet (exact search), exact, rescore
        or target_recall options, a long result list, probed lists too small for the results
        (the search then probes every list), or a list copy to refresh after a write."""
        params = params or {}
        index = self.index
        if (index.model is None or params.get("rescore") or params.get("exact")
                or params.get("target_recall") is not None or limit > LIGHT_SEARCH_LIMIT or not index.flat_is_current):
            return False
        sp = self._search_params(index, params)
        cfg = index.model.cfg
        nshort = max(sp.nshort, limit) if sp.nshort else 0
        probed = sp.nprobe * index.ntotal // cfg.nlist  # codes in the probed lists, lists of average size
        if probed < max(nshort, limit):
            return False
        macs = (max(sp.ef_search, sp.nprobe) * HNSW_NEIGHBOURS * cfg.d + sp.nprobe * cfg.M * cfg.K
                + probed * cfg.M + nshort * cfg.decode_macs)
        return macs <= LIGHT_SEARCH_MACS

    @staticmethod
    def _search_params(index, params: dict) -> SearchParams | None:
        """The index's search parameters for a request's params (None: an exact index)."""
        if index.model is None:
            return None
        if params.get("target_recall") is not None:
            return index.params_for_recall(params["target_recall"])
        default, nlist = SearchParams(), index.model.cfg.nlist
        sp = SearchParams(params.get("nprobe") or min(default.nprobe, nlist),
                          params.get("ef_search") or default.ef_search,
                          default.nshort if params.get("nshort") is None else params["nshort"])
        if params.get("exact"):  # every list, a wide shortlist: exact but for the table order
            sp = SearchParams(nlist, max(sp.ef_search, nlist), max(sp.nshort, EXACT_SHORTLIST))
        return sp

    def _rescore(self, x: np.ndarray, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidates re-ranked by the exact distance to their original vectors (read from disk).
        One deleted meanwhile (no original) is dropped (id -1) rather than ranked by another distance."""
        found = np.unique(I[I >= 0])
        originals = self.originals(found)
        table = np.zeros((len(found) + 1, self.dimension), dtype=np.float32)  # last row: "no original"
        known = np.zeros(len(found) + 1, dtype=bool)
        for r, i in enumerate(found.tolist()):
            if i in originals:
                table[r], known[r] = originals[i], True
        rows = np.where(I >= 0, np.searchsorted(found, I), len(found))
        D = np.where(known[rows], ((x[:, None, :] - table[rows]) ** 2).sum(-1), np.inf).astype(np.float32)
        order = np.argsort(D, axis=1, kind="stable")
        D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
        gone = ~np.isfinite(D)
        D[gone], I[gone] = 0.0, -1  # skipped by `search`
        return D, I

    def originals(self, ids) -> dict[int, np.ndarray]:
        """The stored original vectors of `ids` (absent ones skipped)."""
        with self._reading() as db:
            rows = select_by_ids(db, "originals", "vector", ids)
        return {i: np.frombuffer(v, dtype=np.float32) for i, v in rows}

    def _has_originals(self) -> bool:
        return self.qinco is not None and (self.qinco["keep_originals"] or self.model is None or
                                           self.job is not None)

    # ---- writes --------------------------------------------------------------------------
    def upsert(self, ids: list[int], vectors, payloads: list[dict | None]) -> tuple[int, float]:
        """Encode (no lock), commit to SQLite, then insert in memory.  Returns (seq, encode seconds).

        Everything that can be refused is checked before the commit; the insert after it
        cannot fail on the input (see `_apply`).  Before the first model, points are stored
        as their original vectors only.
        """
        use_threads(self.threads)
        try:
            ids = canonical(ids)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if len(set(ids)) != len(ids):
            raise BadRequest("duplicate ids in one batch")
        if len(payloads) != len(ids):
            raise BadRequest(f"{len(ids)} ids but {len(payloads)} payloads")
        if any(isinstance(i, int) and not 0 <= i < UUID_BASE for i in ids):
            raise BadRequest(f"integer point ids must be in [0, 2^62); larger ones are kept for UUIDs")
        x = self.prepare(vectors)
        model = self.model
        fast = self.fast_ingest and self.refine_pending * 4 * self.dimension < REFINE_QUEUE_BYTES
        encoder = ENCODERS["fast"] if fast else self.encoder
        t0 = time.perf_counter()
        codes = self._codes(model, x, encoder)
        encode_seconds = time.perf_counter() - t0
        try:
            if len(x) != len(ids):
                raise ValueError("ids and vectors do not match")
            payload_json = [None if p is None else json.dumps(p, allow_nan=False) for p in payloads]
        except (ValueError, TypeError, OverflowError) as e:
            raise BadRequest(f"cannot store this batch: {e}") from None
        with self.write_lock:
            self._check_writable()
            if self.model is not model:  # a new model was swapped in meanwhile: its codes, not the old ones
                codes = self._codes(self.model, x, encoder)
            refine = fast and codes is not None
            requeued = 0
            keep = self._has_originals()
            blobs = [c.tobytes() for c in codes] if codes is not None else [b""] * len(ids)
            uuids_before = self.point_ids.count
            try:
                with self._transaction():
                    seq = self.last_seq() + 1
                    ids, _ = self.point_ids.assign(self.db, ids)
                    self.db.executemany("INSERT OR REPLACE INTO points (id, codes, payload, seq) VALUES (?, ?, ?, ?)",
                                        [(i, b, p, seq) for i, b, p in zip(ids, blobs, payload_json)])
                    if keep:
                        self.db.executemany("INSERT OR REPLACE INTO originals (id, vector) VALUES (?, ?)",
                                            [(i, v.tobytes()) for i, v in zip(ids, x)])
                    if codes is not None:  # rewritten: a row of its old vector goes
                        requeued = self._unqueue(ids)
                    if refine:
                        self.db.executemany("INSERT OR REPLACE INTO refine (id, seq, vector) VALUES (?, ?, ?)",
                                            [(i, seq, v.tobytes()) for i, v in zip(ids, x)])
                    self.db.execute("UPDATE meta SET value = ? WHERE key='seq'", (seq,))
            except BaseException:
                self.point_ids.restore(uuids_before)  # rolled back: so are its new UUIDs
                raise
            self.refine_pending += (len(ids) if refine else 0) - requeued
            id_array = np.array(ids, dtype=np.int64)
            if codes is None:
                self._apply(lambda: (self.index.add_vectors(x, id_array), self.payload_indexes.upsert(ids, payloads)))
            else:
                self._apply(lambda: (self.index.add_codes(codes, id_array), self.payload_indexes.upsert(ids, payloads)))
            self._maybe_train()
            if refine:
                self._refine_wake.set()
        self._maybe_snapshot(len(ids))
        return seq, encode_seconds

    def _codes(self, model, x: np.ndarray, encoder=None, workers: int = 0) -> np.ndarray | None:
        """(n, 1 + M) int32 codes of vectors with a model (None before the first one); the
        collection's encoder unless told."""
        if model is None:
            return None
        codes = encode(model, x, encoder or self.encoder, workers=workers).astype(np.int32)
        split_codes(model, codes)
        return codes

    # ---- fast ingest: background refinement --------------------------------------------------
    def _refine_loop(self):
        """Re-encode the points that upserts acknowledged with `fast` codes, oldest first, on the
        training thread budget and at the training job's lower priority."""
        background_thread(self.train_threads, NICE)
        while True:
            self._refine_wake.clear()  # before the checks: a wake-up after them is not lost
            if self.closing or self.closed:
                return
            try:
                busy = self.job is None and not self.broken and self._refine_batch()
            except Exception:
                if self.closing or self.closed:
                    return
                log.exception("%s: refining codes failed; trying again in 10 s", self.name)
                self._refine_wake.wait(10)
                continue
            if not busy and not self.fast_ingest and not self.refine_pending:
                return  # what a run with fast ingest left is done
            if not busy:  # idle, or a job runs (its swap re-encodes every point)
                self._refine_wake.wait(5)

    def _refine_batch(self) -> bool:
        """Re-encode up to REFINE_BATCH queued points; False when none is queued."""
        model = self.model
        with self._reading() as db:
            rows = db.execute("SELECT id, seq, vector FROM refine ORDER BY seq, id LIMIT ?",
                              (REFINE_BATCH,)).fetchall()
        if not rows:
            return False
        x = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), self.dimension)
        codes = self._codes(model, x, workers=1)  # this thread's own torch threads
        with self.write_lock:
            if self.closing or self.closed or self.broken:
                return False
            if self.model is not model:
                return True  # a swap re-encoded everything and emptied the queue
            with self._transaction():
                seq = self.last_seq() + 1
                done = [self.db.execute("UPDATE points SET codes = ?, seq = ? WHERE id = ? AND seq = ?",
                                        (c.tobytes(), seq, i, s)).rowcount == 1
                        for (i, s, _), c in zip(rows, codes)]  # not where rewritten or deleted meanwhile
                removed = self.db.executemany("DELETE FROM refine WHERE id = ? AND seq = ?",
                                              [(i, s) for i, s, _ in rows]).rowcount
                if any(done):
                    self.db.execute("UPDATE meta SET value = ? WHERE key='seq'", (seq,))
            ids = np.array([r[0] for r in rows], dtype=np.int64)[done]
            try:
                if len(ids):
                    self._apply(lambda: self.index.add_codes(codes[done], ids))
            finally:  # counted once the index serves them: `refine_pending == 0` means refined
                self.refine_pending -= removed
            # Counted, not started here: a snapshot thread started from this one would inherit its
            # low priority while it holds the write lock.  The next write starts it.
            self.changed_since_snapshot += len(ids)
        return True

    def _unqueue(self, ids: list[int]) -> int:
        """Drop the refinement rows of `ids` (in the caller's transaction); returns how many."""
        removed = 0
        for i0 in range(0, len(ids), 900):
            chunk = ids[i0:i0 + 900]
            removed += self.db.execute(f"DELETE FROM refine WHERE id IN ({','.join('?' * len(chunk))})",
                                       chunk).rowcount
        return removed

    def _apply(self, change):
        """Apply a committed write to the in-memory index (write lock held).

        Should that fail anyway, the index would miss a committed row that the next
        snapshot then covers: rebuild it from the database instead, and refuse writes
        (until a restart) if even that fails.
        """
        try:
            with self.index_lock.write():
                change()
        except Exception as e:
            log.exception("%s: in-memory write failed after its commit; rebuilding from the database", self.name)
            try:
                with self.index_lock.write():
                    self.index, self.recovery = self._recover()
                    self.payload_indexes = PayloadIndexes(self.payload_indexes.declared)
            except Exception as e2:
                self.broken = (f"a write was committed but the in-memory index could not be rebuilt after it "
                               f"({e2}); restart the service to serve it")
                log.exception("%s: rebuild failed", self.name)
                raise Unavailable(self.broken) from e
            self.changed_since_snapshot = 0

    def delete(self, ids: list[int]) -> tuple[int, int]:
        """Points by client id; returns (seq, number of points that existed)."""
        use_threads(self.threads)
        with self.write_lock:
            self._check_writable()
            seq, existing = self._delete_locked(self._internal(ids))
        self._maybe_snapshot(len(ids))
        return seq, existing

    def _delete_locked(self, ids) -> tuple[int, int]:
        """One durable delete (write lock held)."""
        ids = sorted(set(int(i) for i in ids))
        id_array = np.array(ids, dtype=np.int64)
        with self._transaction():
            seq = self.last_seq() + 1
            existing = 0
            for i0 in range(0, len(ids), 900):
                chunk = ids[i0:i0 + 900]
                existing += self.db.execute(
                    f"DELETE FROM points WHERE id IN ({','.join('?' * len(chunk))})", chunk).rowcount
                self.db.execute(f"DELETE FROM originals WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            self.db.executemany("INSERT OR REPLACE INTO deleted (id, seq) VALUES (?, ?)", [(i, seq) for i in ids])
            self.db.execute("UPDATE meta SET value = ? WHERE key='seq'", (seq,))
            unqueued = self._unqueue(ids)
        self.refine_pending -= unqueued
        self._apply(lambda: (self.index.remove(id_array), self.payload_indexes.delete(ids)))
        return seq, existing

    def records(self, ids, with_payload: bool, with_vector: bool) -> list[dict]:
        """Stored points among `ids` (client ids; absent ones skipped), in the order given."""
        return self._records(self._internal(ids), with_payload, with_vector)  # _records drops repeats

    def _records(self, ids: list[int], with_payload: bool, with_vector: bool) -> list[dict]:
        use_threads(self.threads)
        ids = list(dict.fromkeys(int(i) for i in ids))
        vectors, present = self.stored_vectors(ids) if with_vector else (None, None)
        payloads = self.payloads(ids)
        out = []
        for k, i in enumerate(ids):
            if i not in payloads or (with_vector and not present[k]):
                continue
            record = {"id": self.point_ids.external(i), "payload": payloads[i] if with_payload else None}
            if with_vector:
                record["vector"] = vectors[k].tolist()
            out.append(record)
        return out

    def scroll(self, f, offset: int | str | None, limit: int, with_payload: bool,
               with_vector: bool) -> tuple[list, int | str | None]:
        """A page of points from `offset`, and the first id of the next page.  The order is the
        internal one: integer ids ascending, then UUIDs in the order the collection first saw them."""
        if offset is not None:
            try:
                offset = self._internal([offset], strict=True)[0]
            except NotFound:
                raise BadRequest(f"offset {offset} is not a point id of collection {self.name!r}") from None
        resolve = self.has_id_resolver(f)
        with self.index_lock.read():
            ids = self.filter_ids(f, resolve) if f is not None else self.index.ids()
        start = np.searchsorted(ids, offset) if offset is not None else 0
        page = ids[start:start + limit + 1].tolist()
        nxt = self.point_ids.external(page[limit]) if len(page) > limit else None
        return self._records(page[:limit], with_payload, with_vector), nxt

    def _selected(self, f) -> list[int]:
        """The ids a filter lets through, chosen under the write lock (held by the caller), so
        that no write slips in between choosing the points and changing them."""
        resolve = self.has_id_resolver(f)
        with self.index_lock.read():
            return self.filter_ids(f, resolve).tolist()

    def update_payloads(self, ids: list[int] | None, f, change, chunk: int = 10_000) -> tuple[int, int]:
        """Apply change(payload) -> payload to the points given by ids (one of them not stored:
        NotFound, nothing changed) or by a filter, in durable writes of `chunk` points."""
        use_threads(self.threads)
        with self.write_lock:
            self._check_writable()
            ids = list(dict.fromkeys(self._selected(f) if f is not None else self._internal(ids, strict=True)))
            seq = self.last_seq()
            for i0 in range(0, len(ids), chunk):
                seq = self._update_payload_chunk(ids[i0:i0 + chunk], change, strict=f is None)
        return seq, len(ids)

    def _update_payload_chunk(self, ids: list[int], change, strict: bool) -> int:
        with self._transaction():
            seq = self.last_seq() + 1
            current = dict(select_by_ids(self.db, "points", "payload", ids))
            missing = [i for i in ids if i not in current]
            if missing and strict:
                raise NotFound(f"no point with id {self.point_ids.external(missing[0])} in collection {self.name!r}")
            ids = [i for i in ids if i in current]
            new = [change(json.loads(current[i]) if current[i] is not None else {}) for i in ids]
            try:
                rows = [(None if p is None else json.dumps(p, allow_nan=False), i) for i, p in zip(ids, new)]
            except (ValueError, TypeError) as e:
                raise BadRequest(f"cannot store this payload: {e}") from None
            # The row's seq stays: it says when its codes changed, which recovery replays.
            self.db.executemany("UPDATE points SET payload = ? WHERE id = ?", rows)
            self.db.execute("UPDATE meta SET value = ? WHERE key='seq'", (seq,))
        self._apply(lambda: self.payload_indexes.upsert(ids, new))
        return seq

    def delete_filtered(self, f, chunk: int = 10_000) -> tuple[int, int]:
        """Delete the points a filter lets through, in durable writes of `chunk` points;
        returns (seq, how many)."""
        use_threads(self.threads)
        with self.write_lock:
            self._check_writable()
            ids = self._selected(f)
            seq, existed = self.last_seq(), 0
            for i0 in range(0, len(ids), chunk):
                seq, n = self._delete_locked(ids[i0:i0 + chunk])
                existed += n
        self._maybe_snapshot(existed)
        return seq, existed

    def create_field_index(self, key: str, schema: str) -> int:
        """Declare a payload index (durable; built now, kept up to date by every write)."""
        use_threads(self.threads)
        with self.write_lock:
            self._check_writable()
            with self._transaction():
                self.db.execute("INSERT OR REPLACE INTO payload_indexes (field, schema) VALUES (?, ?)", (key, schema))
            self.payload_indexes.declared[key] = schema
            seq = self.last_seq()
        with self.index_lock.read():
            self.payload_indexes.get(key, self._payload_rows)
        return seq

    def delete_field_index(self, key: str) -> int:
        with self.write_lock:
            self._check_writable()
            if key not in self.payload_indexes.declared:
                raise NotFound(f"collection {self.name!r} has no payload index on {key!r}")
            with self._transaction():
                self.db.execute("DELETE FROM payload_indexes WHERE field = ?", (key,))
            with self.index_lock.write():
                self.payload_indexes.drop(key)
            return self.last_seq()

    # ---- training jobs (service/jobs.py runs them) -----------------------------------------
    def start_training(self, request: dict | None = None, model_source: Path | None = None) -> dict:
        """Start a job: train a model on the originals (request: minutes, bytes, nlist), or take
        the model file `model_source`; encode every point; swap.  Returns the QINCo status."""
        request = request or {}
        with self.write_lock:
            self._check_writable()
            if self.closing:
                raise NotFound(f"collection {self.name!r} is closing")
            if self.job is not None:
                raise Conflict(f"collection {self.name!r} is already training (job {self.job.id}); wait for it "
                               f"or cancel it with DELETE /collections/{self.name}/train")
            if not self._has_originals():
                raise BadRequest(f"collection {self.name!r} keeps no original vectors, so it cannot be re-encoded: "
                                 f"create it by size and distance (with keep_originals) to train it")
            n = self.db.execute("SELECT count(*) FROM originals").fetchone()[0]
            settings = {**self.qinco, **{k: v for k, v in request.items() if v is not None}}
            kind = "train"
            if model_source is not None:
                kind = "swap_in"
                model = self._check_model(model_source)
            else:
                need = min_points(settings.get("nlist"))
                if need > self.train_sample:
                    raise BadRequest(f"nlist {settings['nlist']} needs {need} training points, more than the "
                                     f"{self.train_sample} a job samples (QINCO_TRAIN_SAMPLE)")
                if n < need:
                    raise BadRequest(f"collection {self.name!r} holds {n} points; training needs at least {need}"
                                     + (f" (nlist {settings['nlist']} x {MIN_PER_LIST} per list)"
                                        if settings.get("nlist") else ""))
            record = {"id": uuid.uuid4().hex[:12], "kind": kind, "started": time.time(),
                      "request": {"d": self.dimension, "minutes": settings["train_minutes"],
                                  "bytes": settings["bytes"], "nlist": settings.get("nlist"),
                                  "encoder": self.meta["encoder"], "sample": self.train_sample,
                                  "seed": self.generation}}  # reproducible: the same data, the same model
            job = TrainingJob(self, record, self.train_threads)
            if model_source is not None:  # the job starts at the encoding
                job.dir.mkdir(parents=True, exist_ok=True)
                save_model(model, job.dir / "model.safetensors")
                atomic_write(job.dir / "trained.json", lambda f: f.write(json.dumps(
                    {"val_mse": None, "rq_val_mse": None, "trained_on": None}).encode()))
            with self._transaction():
                self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('job', ?)", (json.dumps(record),))
                self.db.execute("DELETE FROM state WHERE key = 'paused'")
            self.state.pop("paused", None)
            self.state["job"] = record
            self.job = job
            job.start()
        log.info("%s: job %s started (%s, %d points)", self.name, job.id, kind, n)
        return self.qinco_status()

    def _check_model(self, path: Path):
        """A user's model file that this collection can serve."""
        try:
            model = load_model(path)
            QincoIndex(model)  # an IVF model with fitted tables
        except Exception as e:
            raise BadRequest(f"cannot use {path.name}: {type(e).__name__}: {e}") from None
        if model.cfg.d != self.dimension:
            raise BadRequest(f"the model is for dimension {model.cfg.d}; the collection's is {self.dimension}")
        return model

    def _maybe_train(self):
        """Start training once a collection collecting its first points holds `train_after` of them
        (write lock held).  After a failed or cancelled job it waits for an explicit train request."""
        q = self.qinco
        if (q is None or self.model is not None or self.job is not None or not q["train_after"]
                or self.index.ntotal < q["train_after"] or self.state.get("last_error") or self.state.get("paused")):
            return
        threading.Thread(target=self._auto_train, daemon=True).start()  # after the caller releases the lock

    def _auto_train(self):
        try:
            self.start_training()
        except (Conflict, NotFound):
            pass
        except Exception:
            log.exception("%s: automatic training could not start", self.name)

    def resume_job(self):
        """Start again a job that the last run of the server left unfinished."""
        record = self.state.get("job")
        for folder in (self.folder / "jobs").glob("*"):  # of jobs that ended (or were never recorded)
            if record is None or folder.name != record["id"]:
                shutil.rmtree(folder, ignore_errors=True)
        if record is not None and self.job is None and not self.closing:
            log.info("%s: resuming job %s (%s)", self.name, record["id"], record["kind"])
            self.job = TrainingJob(self, record, self.train_threads)
            self.job.start()

    def cancel_training(self) -> bool:
        """Stop the running job; what served before keeps serving.  False if it swapped first."""
        job = self.job
        if job is None:
            raise NotFound(f"collection {self.name!r} has no training job")
        job.cancel()  # waits for the job's thread: a swap under way either commits or not
        with self.write_lock:
            if self.job is not job:
                return False  # it swapped before it could be stopped
            self._end_job(job, None, paused=self.model is None)
        return True

    def job_failed(self, job: TrainingJob, reason: str):
        with self.write_lock:
            if self.job is job and not self.closed:
                self._end_job(job, reason)

    def _end_job(self, job: TrainingJob, error: str | None, paused: bool = False):
        """Forget a job that did not swap (write lock held): its record first, then its files.
        A cancel while collecting pauses automatic training until the next train request."""
        with self._transaction():
            self.db.execute("DELETE FROM state WHERE key = 'job'")
            if error is not None:
                self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('last_error', ?)",
                                (json.dumps(error),))
            if paused:
                self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('paused', 'true')")
        self.state.pop("job", None)
        if error is not None:
            self.state["last_error"] = error
        if paused:
            self.state["paused"] = True
        self.job = None
        shutil.rmtree(job.dir, ignore_errors=True)

    def _changed_since(self, seq: int, db: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray, int]:
        """ids and originals of the points written after `seq`, and the current seq."""
        db.execute("BEGIN")
        try:
            now = db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0]
            rows = db.execute("SELECT p.id, o.vector FROM points p JOIN originals o ON o.id = p.id "
                              "WHERE p.seq > ? ORDER BY p.id", (seq,)).fetchall()
        finally:
            db.execute("COMMIT")
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dimension)
        return ids, x, now

    def swap(self, job: TrainingJob, catch_up_rounds: int = 5):
        """Serve the job's model: its index with every point, then one transaction for the codes
        of every point and the generation.  Writes wait for the last catch-up and that transaction
        (an UPDATE of every row: seconds per million points); searches go on."""
        use_threads(self.threads)
        model_file, trained, encoded = job.outputs()
        model = load_model(model_file)
        new = QincoIndex(model)
        ids = np.fromfile(job.dir / "ids.i64", dtype=np.int64)
        codes = np.fromfile(job.dir / "codes.i32", dtype=np.int32).reshape(len(ids), encoded["width"])
        for i0 in range(0, len(ids), 100_000):
            new.add_codes(codes[i0:i0 + 100_000], ids[i0:i0 + 100_000])
        seq = encoded["seq"]
        for _ in range(catch_up_rounds):  # writes that came during the encoding, without the lock
            with self._reading() as db:
                changed, x, seq = self._changed_since(seq, db)
            if len(changed):
                new.add_codes(self._codes(model, x), changed)
            if len(changed) < 1000 or job.cancelled.is_set():
                break
        with self.write_lock:
            self._check_writable()
            if job.cancelled.is_set():
                raise JobCancelled()
            changed, x, seq = self._changed_since(seq, self.db)
            if len(changed):
                new.add_codes(self._codes(model, x), changed)
            new.remove(np.setdiff1d(new.ids(), self.index.ids()))  # deleted meanwhile
            if new.ntotal != self.index.ntotal:
                raise RuntimeError(f"the new index holds {new.ntotal} points, the collection {self.index.ntotal}")
            generation = self.generation + 1
            save_model(model, self._model_path(generation), {"training": trained})
            fsync_folder(self.folder)  # the file outlives a power loss before the commit names it
            stored_ids, stored_codes = new.stored_codes()
            stats = {**trained, "generation": generation, "swapped": time.time()}
            with self._transaction():
                self.db.executemany("UPDATE points SET codes = ? WHERE id = ?",
                                    [(c.astype(np.int32).tobytes(), int(i)) for i, c in zip(stored_ids, stored_codes)])
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (generation,))
                self.db.execute("DELETE FROM refine")  # every point now has the new model's codes
                self.db.execute("DELETE FROM state WHERE key IN ('job', 'last_error')")
                self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('model', ?)", (json.dumps(stats),))
                if not self.qinco["keep_originals"]:
                    self.db.execute("DELETE FROM originals")
            with self.index_lock.write():
                self.index, self.model, self.generation, self.tuning = new, model, generation, {}
                self.job = None
            self.state = {"model": stats}
            self.refine_pending = 0
            self.changed_since_snapshot = 0
            self._remove_stale_models()
            shutil.rmtree(job.dir, ignore_errors=True)
        threading.Thread(target=self._snapshot_quietly, daemon=True).start()

    def qinco_status(self) -> dict:
        """Where the collection is: phase, job, model, bytes per point (the info's `qinco` block)."""
        job = self.job  # read once: a swap may clear it meanwhile
        job = job.status() if job is not None else None
        if job is not None:
            phase = "training" if job["phase"] in ("queued", "training") else "encoding"
        else:
            phase = "collecting" if self.model is None else "ready"
        stats = self.state.get("model", {})
        ratio = None
        if stats.get("val_mse") is not None and stats.get("rq_val_mse"):
            ratio = round(stats["val_mse"] / stats["rq_val_mse"], 4)
        model = None if self.model is None else {
            "generation": self.generation, "val_mse": stats.get("val_mse"), "rq_val_mse": stats.get("rq_val_mse"),
            "mse_vs_rq": ratio, "trained_on": stats.get("trained_on"), "bytes": self.model.cfg.M,
            "nlist": self.model.cfg.nlist}
        q = self.qinco or {}
        n = self.count()
        memory = self.index.memory_per_point
        try:
            disk = sum(p.stat().st_size for p in self.folder.glob("points.sqlite*")) // max(n, 1)
        except OSError:  # deleted meanwhile
            disk = 0
        return {"phase": phase, "job": job, "model": model,
                "points_encoded": 0 if self.model is None else n,
                "refine_pending": self.refine_pending,
                "last_swap": stats.get("swapped"), "last_error": self.state.get("last_error"),
                "train_after": q.get("train_after", 0), "train_minutes": q.get("train_minutes"),
                "keep_originals": bool(q.get("keep_originals")), "originals": n if self._has_originals() else 0,
                "bytes_per_point": {"memory": memory, "disk": disk}}

    @contextmanager
    def _transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _check_open(self):
        if self.closed:
            raise NotFound(f"collection {self.name!r} was deleted")

    def _check_writable(self):
        self._check_open()
        if self.broken:
            raise Unavailable(self.broken)

    def close(self):
        """Stop a job (it resumes at the next open), wait for a snapshot in progress, then refuse
        everything."""
        with self.write_lock:  # no job can start after this
            self.closing = True
            job = self.job
        self._refine_wake.set()
        if job is not None:
            job.cancel()
        with self._snapshotting, self.write_lock:
            self.closed = True
            self.db.close()

    def info(self) -> dict:
        """Qdrant's collection info (config, counts, payload schema), then QINCo's own fields."""
        model = self.model
        default = SearchParams()
        n = self.count()
        qinco = self.qinco_status()
        if self.broken:
            status = "red"
        elif qinco["job"] is not None or qinco["refine_pending"]:  # Qdrant: yellow while optimizing
            status = "yellow"
        else:
            status = "grey" if model is None else "green"
        qdrant = {"optimizer_status": "ok", "indexed_vectors_count": n if model is not None else 0,
                  "segments_count": 1,
                  "config": {"params": {"vectors": {"size": self.dimension, "distance": DISTANCES[self.metric]},
                                        "shard_number": 1, "replication_factor": 1,
                                        "write_consistency_factor": 1, "on_disk_payload": True},
                             "hnsw_config": {"m": 32, "ef_construct": 40, "full_scan_threshold": 0},
                             "optimizer_config": {"deleted_threshold": 0.0, "vacuum_min_vector_number": 0,
                                                  "default_segment_number": 1, "flush_interval_sec": 0},
                             "quantization_config": None}}
        nlist = model.cfg.nlist if model is not None else 0
        return {**qdrant, "name": self.name, "status": status, "dimension": self.dimension,
                "metric": self.metric, "points_count": n, "bytes_per_vector": self.index.code_bytes,
                "nlist": nlist, "encoder": self.meta["encoder"], "tuned": bool(self.tuning.get("points")),
                "default_params": {"nprobe": min(default.nprobe, nlist), "ef_search": default.ef_search,
                                   "nshort": default.nshort} if model is not None else {"exact": True},
                "payload_schema": self.payload_indexes.schema(), "qinco": qinco,
                "error": self.broken}


class DataDirLocked(RuntimeError):
    pass


class Store:
    """The collections of a data directory, which one process at a time may own."""

    def __init__(self, data_dir: Path, snapshot_every: int = 50_000, threads: int = 0, train_threads: int = 1,
                 train_sample: int = 100_000, fast_ingest: bool = True):
        self.data_dir = Path(data_dir).resolve()
        self.root = self.data_dir / "collections"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._lock(self.data_dir)
        self.snapshot_every = snapshot_every
        self.threads = threads
        self.train_threads, self.train_sample = train_threads, train_sample
        self.fast_ingest = fast_ingest
        self.collections: dict[str, Collection] = {}
        self.failed: dict[str, str] = {}  # collections that could not be opened, and why
        self.lock = threading.Lock()
        self.closed = False

    @staticmethod
    def _lock(data_dir: Path):
        """An exclusive lock on the data directory: two servers would overwrite each other's
        snapshots and sequence numbers.  The kernel drops it when the process dies."""
        f = open(data_dir / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise DataDirLocked(f"the data directory {data_dir} is in use by another QINCo Search process; "
                                f"give each server its own data directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f

    def open_all(self):
        """Open every collection; one that fails is listed in `failed` and the others serve."""
        for folder in sorted(self.root.iterdir()):
            with self.lock:
                if self.closed:
                    return
                if folder.name.startswith("."):
                    shutil.rmtree(folder, ignore_errors=True)  # an interrupted create or delete
                elif (folder / "collection.json").exists():
                    try:
                        self.collections[folder.name] = c = self._open(folder)
                        c.resume_job()
                    except Exception as e:
                        log.exception("collection %s could not be opened", folder.name)
                        self.failed[folder.name] = f"{type(e).__name__}: {e}"

    def get(self, name: str) -> Collection:
        try:
            return self.collections[name]
        except KeyError:
            if name in self.failed:
                raise Unavailable(f"collection {name!r} could not be opened: {self.failed[name]}") from None
            raise NotFound(f"collection {name!r} not found") from None

    def names(self) -> list[str]:
        return sorted(set(self.collections) | set(self.failed))

    def resolve(self, path: str) -> Path:
        """A user-given path, inside the data directory only."""
        try:
            p = (self.data_dir / path).resolve()
            exists = p.exists()
        except (ValueError, OSError) as e:  # a NUL byte, a name too long, a loop of links
            raise BadRequest(f"path {path!r} cannot be used: {e}") from None
        if not p.is_relative_to(self.data_dir):
            raise BadRequest(f"path {path!r} is outside the data directory")
        if not exists:
            raise BadRequest(f"path {path!r} does not exist in the data directory")
        return p

    def _open(self, folder: Path) -> Collection:
        return Collection(folder, self.snapshot_every, self.threads, self.train_threads, self.train_sample,
                          self.fast_ingest)

    def create(self, name: str, metric: str, encoder: str, source: Path | None = None, from_index: bool = False,
               size: int | None = None, qinco: dict | None = None) -> Collection:
        """A new collection from a model file or an index directory (a path already checked), or,
        with `size` and `qinco` settings, one that trains its own model."""
        with self.lock:
            if self.closed:
                raise Unavailable("the service is shutting down")
            if name in self.collections or name in self.failed:
                raise Conflict(f"collection {name!r} already exists")
            tmp = self.root / f".new-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                if size is not None:
                    self._populate_trainable(tmp, name, metric, encoder, size, qinco)
                else:
                    self._populate(tmp, name, metric, encoder, source, from_index)
                os.replace(tmp, self.root / name)
            except BadRequest as e:  # name paths as the user gave them: inside the data directory
                shutil.rmtree(tmp, ignore_errors=True)
                raise BadRequest(str(e).replace(f"{self.data_dir}/", "")) from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            try:
                collection = self._open(self.root / name)
            except Exception as e:
                self._discard(self.root / name, name)
                raise BadRequest(f"the new collection cannot be opened: {e}") from None
            self.collections[name] = collection
            return collection

    @staticmethod
    def _populate(folder: Path, name: str, metric: str, encoder: str, source: Path, from_index: bool):
        try:
            if from_index:
                index = QincoIndex.load(source)
            else:
                index = QincoIndex(load_model(source))  # checks it can serve: IVF, fitted tables
        except Exception as e:  # a user's file, damaged in any way: never a 500
            raise BadRequest(f"cannot use {source.name}: {type(e).__name__}: {e}") from None
        save_model(index.model, folder / "model.safetensors")
        if index.tuning:
            atomic_write(folder / "tuning.json", lambda f: f.write(json.dumps(index.tuning).encode()))
        if index.ntotal:  # import the index's codes as the first write
            db = connect(folder / "points.sqlite")
            db.executescript(SCHEMA)
            ids, codes = index.stored_codes()
            if len(ids) and not (ids.min() >= 0 and ids.max() < UUID_BASE):
                db.close()
                raise BadRequest(f"cannot use {source.name}: its point ids must be in [0, 2^62) (the ids above are "
                                 f"UUIDs'); rebuild it with --ids in that range")
            db.execute("BEGIN")
            db.executemany("INSERT INTO points (id, codes, payload, seq) VALUES (?, ?, NULL, 1)",
                           [(int(i), c.astype(np.int32).tobytes()) for i, c in zip(ids, codes)])
            db.execute("UPDATE meta SET value = 1 WHERE key='seq'")
            db.execute("COMMIT")
            db.close()
        meta = {"name": name, "uuid": str(uuid.uuid4()), "metric": metric, "encoder": encoder,
                "created": time.time()}
        atomic_write(folder / "collection.json", lambda f: f.write(json.dumps(meta).encode()))

    @staticmethod
    def _populate_trainable(folder: Path, name: str, metric: str, encoder: str, size: int, qinco: dict):
        db = connect(folder / "points.sqlite")
        db.executescript(SCHEMA)
        db.close()
        meta = {"name": name, "uuid": str(uuid.uuid4()), "metric": metric, "encoder": encoder,
                "created": time.time(), "size": size, "qinco": qinco}
        atomic_write(folder / "collection.json", lambda f: f.write(json.dumps(meta).encode()))

    def delete(self, name: str):
        with self.lock:
            if name in self.collections:
                collection = self.collections.pop(name)
                collection.close()  # waits for a snapshot in progress
            elif name not in self.failed:
                raise NotFound(f"collection {name!r} not found")
            self.failed.pop(name, None)
            self._discard(self.root / name, name)

    def _discard(self, folder: Path, name: str):
        if folder.exists():
            trash = self.root / f".deleted-{name}-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def close(self):
        """Close every collection (the loader stops at its next step), then free the directory."""
        with self.lock:
            self.closed = True
            for c in self.collections.values():
                c.close()
        self._lock_file.close()
