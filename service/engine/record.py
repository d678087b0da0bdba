"""The durable record of one collection: points.sqlite, the record of truth.  This is the only
module that knows its tables:

  points           id -> payload JSON, seq (the write that last stored the point or its payload)
  meta             'seq' (the last write's sequence number); 'tracked_writes' (how many of the writes
                   set points.seq on payload changes: builds before session 16 counted none, and
                   older ones did not set it); vector space 0's 'generation' (its model),
                   'originals_file' (its originals file's generation), 'originals_rows' (its rows)
                   and 'original_rows_version' (bumped by each transaction that changes original_rows)
  payload_indexes  declared payload indexes: field -> schema
  state            vector space 0's training lifecycle facts: 'job', 'last_error', 'paused', 'model'
  uuids            client UUID -> internal id (service/engine/ids.py)

and, per vector space (engine/space.py), tables named for space 0 as below and with a suffix
`_k` for space k >= 1 (so do its meta and state keys: 'generation_1', 'job_1'):

  codes            id -> codes (IVF list first; empty before the first model), seq of the write
  deleted          ids whose vector was deleted, with the seq of that delete (until a snapshot covers it)
  original_rows    id -> row of the space's originals file (engine/originals.py; self-training spaces)
  refine           points acknowledged with `fast` codes, waiting for better ones: id, seq, vector

A point is its `points` row; it holds a vector of space k when space k's `codes` (or, collecting,
`original_rows`) has its row.  Every write is one transaction under the collection's write lock,
and each that changes points takes the next sequence number (`Record.write`).  WAL with
synchronous=FULL: a write is acknowledged after its commit, which survives a power loss.  Reads
take no collection lock: each thread reads on its own connection (`Record.reading`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import NotFound
from .space_record import SpaceRecord, space_schema
from .sql import READ_ROWS, blobs_of, connect, delete_in, last_seq, select_by_ids, select_in

SCHEMA = """
CREATE TABLE IF NOT EXISTS points (id INTEGER PRIMARY KEY, payload TEXT, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS points_seq ON points(seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS payload_indexes (field TEXT PRIMARY KEY, schema TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('seq', 0);
INSERT OR IGNORE INTO meta VALUES ('tracked_writes', 0);
"""


def migrate(db: sqlite3.Connection):
    """A record written before named vectors kept space 0's codes in `points`: move them to
    `codes`, in one transaction, once."""
    if "codes" not in [r[1] for r in db.execute("PRAGMA table_info(points)")]:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in space_schema(0).split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO codes (id, codes, seq) SELECT id, codes, seq FROM points")
        db.execute("ALTER TABLE points DROP COLUMN codes")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def create(path: Path, spaces: int = 1) -> sqlite3.Connection:
    """A record with its tables (those of `spaces` vector spaces), open for writing; an older
    record is migrated."""
    db = connect(path)
    db.executescript(SCHEMA)
    migrate(db)
    for k in range(spaces):
        db.executescript(space_schema(k))
    return db


@dataclass
class Write:
    """One write in progress: its sequence number, recorded unless it turns out to change nothing."""
    seq: int
    changed: bool = True


@dataclass
class Reader:
    """One thread's read connection, and the lock its reads hold (re-entrant: reads may nest)."""
    conn: sqlite3.Connection
    lock: threading.RLock = field(default_factory=threading.RLock)


class Record:
    """A collection's points.sqlite: the writer's connection (used under the write lock) and a
    reader connection per thread.  `space(k)` is the part of vector space k."""

    def __init__(self, path: Path, name: str, spaces: list[dict]):
        """spaces: the vector spaces' entries in collection.json (engine/space.py)."""
        self.path, self.name = path, name
        self.db = create(path, len(spaces))  # the writer's
        self._local = threading.local()
        self._readers: list[Reader] = []  # every thread's reader, to close
        self._readers_lock = threading.Lock()
        self.closed = False
        self.spaces = [SpaceRecord(self, k, meta) for k, meta in enumerate(spaces)]
        for space in self.spaces:  # transactions, once every space takes part in them
            space.move_blob_originals()

    def space(self, k: int) -> SpaceRecord:
        return self.spaces[k]

    # ---- writes (write lock held) ----------------------------------------------------------------
    @contextmanager
    def transaction(self):
        """One transaction; the originals it appended are durable before its commit."""
        self.db.execute("BEGIN IMMEDIATE")
        for space in self.spaces:
            space.began()
        try:
            yield
            for space in self.spaces:
                space.before_commit()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # a COMMIT that failed (a full disk) leaves it open
                self.db.execute("ROLLBACK")
            for space in self.spaces:
                space.rolled_back()
            raise
        for space in self.spaces:
            space.committed()

    @contextmanager
    def write(self) -> Iterator[Write]:
        """A transaction that takes the next sequence number: the one way a write gets its seq."""
        with self.transaction():
            w = Write(last_seq(self.db) + 1)
            yield w
            if w.changed:
                self.db.execute("UPDATE meta SET value = ? WHERE key='seq'", (w.seq,))
                self.db.execute("UPDATE meta SET value = value + 1 WHERE key='tracked_writes'")

    def last_seq(self) -> int:
        return last_seq(self.db)

    def tracked_writes(self) -> int:
        """Writes counted by builds that keep points.seq for payload changes: a snapshot's payload
        indexes can be brought up to date only if every write since it was one of them."""
        return self.db.execute("SELECT value FROM meta WHERE key='tracked_writes'").fetchone()[0]

    def put_points(self, ids, payloads: list[str | None], seq: int):
        """Points with their payloads (their vectors: SpaceRecord.put_codes)."""
        self.db.executemany("INSERT OR REPLACE INTO points (id, payload, seq) VALUES (?, ?, ?)",
                            [(i, p, seq) for i, p in zip(ids, payloads)])

    def delete_points(self, ids: list[int]) -> int:
        """Points' rows (their vectors: SpaceRecord.delete_vectors); returns how many existed."""
        return delete_in(self.db, "points", ids)

    def existing(self, ids) -> set[int]:
        """Which of `ids` are stored points (read in the write's transaction)."""
        return {r[0] for r in select_in(self.db, "points", "id", "id", [int(i) for i in ids])}

    def forget_deletes(self, seq: int):
        """Deletes up to `seq`, which a snapshot now covers."""
        for space in self.spaces:
            self.db.execute(f"DELETE FROM {space.table('deleted')} WHERE seq <= ?", (seq,))

    def payloads_to_change(self, ids) -> dict[int, str | None]:
        """The payload JSON of the stored points among `ids`, read in the write's transaction."""
        return dict(select_by_ids(self.db, "points", "payload", ids))

    def set_payloads(self, rows: list[tuple[str | None, int]], seq: int):
        """New payloads (payload JSON, id); the rows' seq says a snapshot's payload index lacks them."""
        self.db.executemany("UPDATE points SET payload = ?, seq = ? WHERE id = ?", [(p, seq, i) for p, i in rows])

    def declare_payload_index(self, field: str, schema: str):
        self.db.execute("INSERT OR REPLACE INTO payload_indexes (field, schema) VALUES (?, ?)", (field, schema))

    def drop_payload_index(self, field: str):
        self.db.execute("DELETE FROM payload_indexes WHERE field = ?", (field,))

    # ---- what opening reads (writer's connection, before any thread starts) -------------------------
    def declared_payload_indexes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT field, schema FROM payload_indexes"))

    def point_ids(self) -> np.ndarray:
        """Every stored point's id, ascending."""
        rows = self.db.execute("SELECT id FROM points ORDER BY id")
        chunks = []
        while batch := rows.fetchmany(READ_ROWS):
            chunks.append(np.array([r[0] for r in batch], dtype=np.int64))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)

    def point_ids_after(self, seq: int) -> np.ndarray:
        """The ids of the points stored, or whose payload changed, after `seq`."""
        rows = self.db.execute("SELECT id FROM points WHERE seq > ?", (seq,))
        return np.array([r[0] for r in rows], dtype=np.int64)

    def payloads_after(self, seq: int) -> Iterator[list[tuple[int, dict | None]]]:
        """(id, payload) of those points, in chunks."""
        rows = self.db.execute("SELECT id, payload FROM points WHERE seq > ?", (seq,))
        while batch := rows.fetchmany(READ_ROWS):
            yield parsed(batch)

    # ---- reads (any thread, no lock) ---------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection.  A collection deleted meanwhile (its folder gone, or a new
        collection of the same name in it) answers NotFound, never another collection's rows or a 500."""
        self.check_open()
        try:
            reader = self._reader()
        except sqlite3.Error:  # the folder removed since the check
            self.check_open()
            raise
        with reader.lock:  # `close` waits for the read: a connection closed mid-read crashes
            self.check_open()
            yield reader.conn

    def _reader(self) -> Reader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = Reader(connect(self.path))
            with self._readers_lock:
                if self.closed:  # `close` has taken the list already
                    reader.conn.close()
                    raise NotFound(f"collection {self.name!r} was deleted")
                self._readers.append(reader)  # closed with the record: request threads outlive it
        return reader

    def check_open(self):
        if self.closed:
            raise NotFound(f"collection {self.name!r} was deleted")

    def payload_rows(self) -> Iterator[tuple[int, dict | None]]:
        """(id, payload) of every stored point, read in one pass."""
        with self.reading() as db:
            rows = db.execute("SELECT id, payload FROM points").fetchall()
        yield from parsed(rows)

    def payloads(self, ids) -> dict[int, dict | None]:
        with self.reading() as db:
            rows = select_by_ids(db, "points", "payload", ids)
        return dict(parsed(rows))

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*")) \
            + sum(s.file.size_on_disk() for s in self.spaces if s.file is not None)

    def close(self):
        self.closed = True
        self.db.close()  # the originals files close once no reader holds them
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for reader in readers:  # after the read running on it, if any; later ones answer NotFound
            with reader.lock:
                reader.conn.close()


def parsed(rows) -> list[tuple[int, dict | None]]:
    """(id, payload JSON) rows with their payloads parsed."""
    return [(i, json.loads(p) if p is not None else None) for i, p in rows]


def import_codes(path: Path, ids: np.ndarray, codes: np.ndarray):
    """A new record holding these points (no payloads) as its first write, seq 1."""
    db = create(path)
    try:
        db.execute("BEGIN")
        db.executemany("INSERT INTO points (id, payload, seq) VALUES (?, NULL, 1)", ((int(i),) for i in ids))
        db.executemany("INSERT INTO codes (id, codes, seq) VALUES (?, ?, 1)",
                       ((int(i), blob) for i, blob in zip(ids, blobs_of(codes))))
        db.execute("UPDATE meta SET value = 1 WHERE key IN ('seq', 'tracked_writes')")
        db.execute("COMMIT")
    finally:
        db.close()
