"""The durable record of one collection: points.sqlite, the record of truth.  This is the only
module that knows its tables:

  points           id -> codes (IVF list first; empty before the first model), payload JSON, seq
  deleted          deleted ids with the seq of their delete (until a snapshot covers them)
  meta             'seq' (the last write's sequence number) and 'generation' (the model's)
  payload_indexes  declared payload indexes: field -> schema
  originals        id -> original vector (self-training collections)
  state            the training lifecycle's facts: 'job', 'last_error', 'paused', 'model'
  refine           points acknowledged with `fast` codes, waiting for better ones: id, seq, vector
  uuids            client UUID -> internal id (service/engine/ids.py)

Every write is one transaction under the collection's write lock, and each that changes points
takes the next sequence number (`Record.write`).  WAL with synchronous=FULL: a write is
acknowledged after its commit, which survives a power loss.  Reads take no lock: each thread
reads on its own connection (`Record.reading`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import NotFound

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
MAX_PARAMS = 900  # bound parameters per statement: under SQLite's limit (999 in older builds)
READ_ROWS = 50_000  # rows fetched at a time when a whole table is read


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only kill -9
    return conn


def connect_read_only(path: Path) -> sqlite3.Connection:
    """The training worker's connection: it never writes the record."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)


def create(path: Path) -> sqlite3.Connection:
    """A new record with its tables, open for writing."""
    db = connect(path)
    db.executescript(SCHEMA)
    return db


def array_of(blobs: list[bytes], dtype, width: int) -> np.ndarray:
    """Blobs of one row each -> an (n, width) array (vectors: float32; codes: int32; UUIDs: uint8)."""
    return np.frombuffer(b"".join(blobs), dtype=dtype).reshape(len(blobs), width)


def in_chunks(values) -> Iterator[tuple[list, str]]:
    """Values MAX_PARAMS at a time, each chunk with its '?,?,...' placeholders."""
    values = list(values)
    for i0 in range(0, len(values), MAX_PARAMS):
        chunk = values[i0:i0 + MAX_PARAMS]
        yield chunk, ",".join("?" * len(chunk))


def select_in(db: sqlite3.Connection, table: str, columns: str, key: str, values) -> list[tuple]:
    """Rows of `table` whose `key` is among `values` (absent ones skipped)."""
    out = []
    for chunk, marks in in_chunks(values):
        out += db.execute(f"SELECT {columns} FROM {table} WHERE {key} IN ({marks})", chunk).fetchall()
    return out


def delete_in(db: sqlite3.Connection, table: str, ids) -> int:
    """Delete the rows of `ids`; returns how many there were."""
    return sum(db.execute(f"DELETE FROM {table} WHERE id IN ({marks})", chunk).rowcount
               for chunk, marks in in_chunks(int(i) for i in ids))


def select_by_ids(db: sqlite3.Connection, table: str, column: str, ids) -> list[tuple]:
    """(id, column) rows of `table` for `ids` (absent ones skipped)."""
    return select_in(db, table, f"id, {column}", "id", [int(i) for i in ids])


def last_seq(db: sqlite3.Connection) -> int:
    return db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0]


# ---- what the training worker reads (read-only, in its own process) -------------------------------

def sample_originals(db: sqlite3.Connection, d: int, n: int, seed: int) -> np.ndarray:
    """Up to n original vectors chosen at random, in one read transaction (points deleted
    meanwhile cannot leave holes): training never loads a whole large collection."""
    db.execute("BEGIN")
    try:
        ids = np.array([r[0] for r in db.execute("SELECT id FROM originals")], dtype=np.int64)
        if len(ids) > n:
            ids = np.random.default_rng(seed).choice(ids, n, replace=False)
        blobs = [v for _, v in select_by_ids(db, "originals", "vector", ids)]
    finally:
        db.execute("COMMIT")
    return array_of(blobs, np.float32, d)


@contextmanager
def originals_as_of_now(db: sqlite3.Connection, d: int, chunk: int):
    """(seq, count, batches of (ids, vectors) in id order): every original as of one sequence
    number, read in one transaction (writes after `seq` are the server's to catch up)."""
    db.execute("BEGIN")
    try:
        seq = last_seq(db)
        total = db.execute("SELECT count(*) FROM originals").fetchone()[0]
        rows = db.execute("SELECT id, vector FROM originals ORDER BY id")

        def batches():
            while batch := rows.fetchmany(chunk):
                yield np.array([r[0] for r in batch], dtype=np.int64), array_of([r[1] for r in batch], np.float32, d)
        yield seq, total, batches()
    finally:
        db.execute("COMMIT")


@dataclass
class Write:
    """One write in progress: its sequence number, recorded unless it turns out to change nothing."""
    seq: int
    changed: bool = True


class Record:
    """A collection's points.sqlite: the writer's connection (used under the write lock) and a
    reader connection per thread."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self.db = create(path)  # the writer's
        self._local = threading.local()
        self.closed = False

    # ---- writes (write lock held) ----------------------------------------------------------------
    @contextmanager
    def transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[Write]:
        """A transaction that takes the next sequence number: the one way a write gets its seq."""
        with self.transaction():
            w = Write(last_seq(self.db) + 1)
            yield w
            if w.changed:
                self.db.execute("UPDATE meta SET value = ? WHERE key='seq'", (w.seq,))

    def last_seq(self) -> int:
        return last_seq(self.db)

    def put_points(self, ids, codes: list[bytes], payloads: list[str | None], seq: int):
        self.db.executemany("INSERT OR REPLACE INTO points (id, codes, payload, seq) VALUES (?, ?, ?, ?)",
                            [(i, c, p, seq) for i, c, p in zip(ids, codes, payloads)])

    def put_originals(self, ids, x: np.ndarray):
        self.db.executemany("INSERT OR REPLACE INTO originals (id, vector) VALUES (?, ?)",
                            [(i, v.tobytes()) for i, v in zip(ids, x)])

    def delete_points(self, ids: list[int], seq: int) -> int:
        """Points and their originals, recorded as deleted at `seq`; returns how many existed."""
        existing = delete_in(self.db, "points", ids)
        delete_in(self.db, "originals", ids)
        self.db.executemany("INSERT OR REPLACE INTO deleted (id, seq) VALUES (?, ?)", [(i, seq) for i in ids])
        return existing

    def forget_deletes(self, seq: int):
        """Deletes up to `seq`, which a snapshot now covers."""
        self.db.execute("DELETE FROM deleted WHERE seq <= ?", (seq,))

    def payloads_to_change(self, ids) -> dict[int, str | None]:
        """The payload JSON of the stored points among `ids`, read in the write's transaction."""
        return dict(select_by_ids(self.db, "points", "payload", ids))

    def set_payloads(self, rows: list[tuple[str | None, int]]):
        # The row's seq stays: it says when its codes changed, which recovery replays.
        self.db.executemany("UPDATE points SET payload = ? WHERE id = ?", rows)

    def set_codes(self, ids, codes: np.ndarray):
        self.db.executemany("UPDATE points SET codes = ? WHERE id = ?",
                            [(c.astype(np.int32).tobytes(), int(i)) for i, c in zip(ids, codes)])

    def set_generation(self, generation: int):
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (generation,))

    def declare_payload_index(self, field: str, schema: str):
        self.db.execute("INSERT OR REPLACE INTO payload_indexes (field, schema) VALUES (?, ?)", (field, schema))

    def drop_payload_index(self, field: str):
        self.db.execute("DELETE FROM payload_indexes WHERE field = ?", (field,))

    def put_fact(self, key: str, value):
        self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def drop_facts(self, *keys: str):
        self.db.execute(f"DELETE FROM state WHERE key IN ({','.join('?' * len(keys))})", keys)

    def drop_originals(self):
        self.db.execute("DELETE FROM originals")

    # ---- the refine queue (fast ingest) -----------------------------------------------------------
    def queue(self, ids, x: np.ndarray, seq: int):
        self.db.executemany("INSERT OR REPLACE INTO refine (id, seq, vector) VALUES (?, ?, ?)",
                            [(i, seq, v.tobytes()) for i, v in zip(ids, x)])

    def unqueue(self, ids) -> int:
        """Drop the queue rows of `ids`; returns how many."""
        return delete_in(self.db, "refine", ids)

    def unqueue_all(self):
        self.db.execute("DELETE FROM refine")

    def refine_codes(self, rows: list[tuple[int, int]], codes: np.ndarray, seq: int) -> tuple[list[bool], int]:
        """Better codes for queued (id, seq) rows, where the point was not rewritten or deleted
        since; the rows leave the queue.  Returns which were written and how many left."""
        done = [self.db.execute("UPDATE points SET codes = ?, seq = ? WHERE id = ? AND seq = ?",
                                (c.tobytes(), seq, i, s)).rowcount == 1 for (i, s), c in zip(rows, codes)]
        removed = self.db.executemany("DELETE FROM refine WHERE id = ? AND seq = ?", rows).rowcount
        return done, removed

    # ---- what opening reads (writer's connection, before any thread starts) -------------------------
    def generation(self) -> int:
        return self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]

    def facts(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM state")}

    def declared_payload_indexes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT field, schema FROM payload_indexes"))

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def changed_ids(self, seq: int) -> list[int]:
        """Ids written or deleted after `seq`."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM points WHERE seq > ? UNION SELECT id FROM deleted WHERE seq > ?", (seq, seq))]

    def codes_after(self, seq: int, width: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, codes) of the points written after `seq`, in batches."""
        rows = self.db.execute("SELECT id, codes FROM points WHERE seq > ? ORDER BY id", (seq,))
        while batch := rows.fetchmany(READ_ROWS):
            yield np.array([r[0] for r in batch], dtype=np.int64), array_of([r[1] for r in batch], np.int32, width)

    def all_originals(self, d: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = self.db.execute("SELECT id, vector FROM originals ORDER BY id")
        while batch := rows.fetchmany(READ_ROWS):
            yield np.array([r[0] for r in batch], dtype=np.int64), array_of([r[1] for r in batch], np.float32, d)

    # ---- reads (any thread, no lock) ---------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection.  A collection deleted meanwhile (its folder gone, or a new
        collection of the same name in it) answers NotFound, never another collection's rows or a 500."""
        self.check_open()
        try:
            yield self._reader()
        except sqlite3.Error:
            self.check_open()
            raise
        self.check_open()

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
        return conn

    def check_open(self):
        if self.closed:
            raise NotFound(f"collection {self.name!r} was deleted")

    def payload_rows(self) -> Iterator[tuple[int, dict | None]]:
        """(id, payload) of every stored point, read in one pass."""
        with self.reading() as db:
            rows = db.execute("SELECT id, payload FROM points").fetchall()
        for i, payload in rows:
            yield i, json.loads(payload) if payload is not None else None

    def payloads(self, ids) -> dict[int, dict | None]:
        with self.reading() as db:
            rows = select_by_ids(db, "points", "payload", ids)
        return {i: json.loads(p) if p is not None else None for i, p in rows}

    def originals(self, ids) -> dict[int, np.ndarray]:
        """The stored original vectors of `ids` (absent ones skipped)."""
        with self.reading() as db:
            rows = select_by_ids(db, "originals", "vector", ids)
        if not rows:
            return {}
        return dict(zip([i for i, _ in rows], array_of([v for _, v in rows], np.float32, -1)))

    def queued(self, limit: int) -> list[tuple[int, int, bytes]]:
        """The oldest (id, seq, vector) rows of the refine queue."""
        with self.reading() as db:
            return db.execute("SELECT id, seq, vector FROM refine ORDER BY seq, id LIMIT ?", (limit,)).fetchall()

    def originals_written_after(self, seq: int, d: int, writer: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """ids and originals of the points written after `seq`, and the current seq, read together
        (on this thread's reader, or on the writer's connection: write lock held)."""
        if writer:
            return _originals_after(self.db, seq, d)
        with self.reading() as db:
            return _originals_after(db, seq, d)

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))

    def close(self):
        self.closed = True
        self.db.close()


def _originals_after(db: sqlite3.Connection, seq: int, d: int) -> tuple[np.ndarray, np.ndarray, int]:
    db.execute("BEGIN")
    try:
        now = last_seq(db)
        rows = db.execute("SELECT p.id, o.vector FROM points p JOIN originals o ON o.id = p.id "
                          "WHERE p.seq > ? ORDER BY p.id", (seq,)).fetchall()
    finally:
        db.execute("COMMIT")
    return np.array([r[0] for r in rows], dtype=np.int64), array_of([r[1] for r in rows], np.float32, d), now


def import_codes(path: Path, ids: np.ndarray, codes: np.ndarray):
    """A new record holding these points (no payloads) as its first write, seq 1."""
    db = create(path)
    try:
        db.execute("BEGIN")
        db.executemany("INSERT INTO points (id, codes, payload, seq) VALUES (?, ?, NULL, 1)",
                       [(int(i), c.astype(np.int32).tobytes()) for i, c in zip(ids, codes)])
        db.execute("UPDATE meta SET value = 1 WHERE key='seq'")
        db.execute("COMMIT")
    finally:
        db.close()
