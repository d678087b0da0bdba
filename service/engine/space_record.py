"""A vector space's tables in the collection's record (engine/record.py lists them): its codes,
deletes, originals and refine queue, its generation and lifecycle facts; and the read-only reads
of a training job's worker."""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .sql import READ_ROWS, array_of, delete_in, last_seq, select_by_ids

if TYPE_CHECKING:  # annotations only: the record imports this module
    from .record import Record


def space_schema(space: int) -> str:
    """The tables of vector space `space` (engine/record.py lists them)."""
    s = scoped("", space)
    return f"""
CREATE TABLE IF NOT EXISTS codes{s} (id INTEGER PRIMARY KEY, codes BLOB NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS codes{s}_seq ON codes{s}(seq);
CREATE TABLE IF NOT EXISTS deleted{s} (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS originals{s} (id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS refine{s} (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS refine{s}_order ON refine{s}(seq, id);
INSERT OR IGNORE INTO meta VALUES ('generation{s}', 0);
"""


def scoped(name: str, space: int) -> str:
    """A table, meta or state key of vector space `space`: space 0's keep the names that records
    written before named vectors have."""
    return name if space == 0 else f"{name}_{space}"


# ---- what the training worker reads (read-only, in its own process) -------------------------------
def check_originals_table(table: str) -> str:
    """A space's originals table named by a job's request (read from its file)."""
    if not re.fullmatch(r"originals(_[0-9]{1,3})?", table):
        raise ValueError(f"not an originals table: {table!r}")
    return table


def sample_originals(db: sqlite3.Connection, d: int, n: int, seed: int, table: str = "originals") -> np.ndarray:
    """Up to n original vectors chosen at random, in one read transaction (points deleted
    meanwhile cannot leave holes): training never loads a whole large collection."""
    db.execute("BEGIN")
    try:
        ids = np.array([r[0] for r in db.execute(f"SELECT id FROM {check_originals_table(table)}")],
                       dtype=np.int64)
        if len(ids) > n:
            ids = np.random.default_rng(seed).choice(ids, n, replace=False)
        blobs = [v for _, v in select_by_ids(db, table, "vector", ids)]
    finally:
        db.execute("COMMIT")
    return array_of(blobs, np.float32, d)


@contextmanager
def originals_as_of_now(db: sqlite3.Connection, d: int, chunk: int, table: str = "originals"):
    """(seq, count, batches of (ids, vectors) in id order): every original as of one sequence
    number, read in one transaction (writes after `seq` are the server's to catch up)."""
    db.execute("BEGIN")
    try:
        seq = last_seq(db)
        total = db.execute(f"SELECT count(*) FROM {check_originals_table(table)}").fetchone()[0]
        rows = db.execute(f"SELECT id, vector FROM {table} ORDER BY id")

        def batches():
            while batch := rows.fetchmany(chunk):
                yield np.array([r[0] for r in batch], dtype=np.int64), array_of([r[1] for r in batch], np.float32, d)
        yield seq, total, batches()
    finally:
        db.execute("COMMIT")


class SpaceRecord:
    """The tables of one vector space (see the module's docstring), on the record's connections."""

    def __init__(self, record: Record, k: int):
        self.record, self.k = record, k

    def table(self, name: str) -> str:
        return scoped(name, self.k)

    @property
    def db(self) -> sqlite3.Connection:
        return self.record.db

    # ---- writes (write lock held, in the record's transaction) -------------------------------------
    def put_codes(self, ids, codes: list[bytes], seq: int):
        self.db.executemany(f"INSERT OR REPLACE INTO {self.table('codes')} (id, codes, seq) VALUES (?, ?, ?)",
                            [(i, c, seq) for i, c in zip(ids, codes)])

    def put_originals(self, ids, x: np.ndarray):
        self.db.executemany(f"INSERT OR REPLACE INTO {self.table('originals')} (id, vector) VALUES (?, ?)",
                            [(i, v.tobytes()) for i, v in zip(ids, x)])

    def delete_vectors(self, ids: list[int], seq: int) -> int:
        """The vectors of `ids` in this space (codes, original, queue row), recorded as deleted at
        `seq`; returns how many queue rows went."""
        delete_in(self.db, self.table("codes"), ids)
        delete_in(self.db, self.table("originals"), ids)
        self.db.executemany(f"INSERT OR REPLACE INTO {self.table('deleted')} (id, seq) VALUES (?, ?)",
                            [(int(i), seq) for i in ids])
        return self.unqueue(ids)

    def set_codes(self, ids, codes: np.ndarray):
        self.db.executemany(f"UPDATE {self.table('codes')} SET codes = ? WHERE id = ?",
                            [(c.astype(np.int32).tobytes(), int(i)) for i, c in zip(ids, codes)])

    def set_generation(self, generation: int):
        self.db.execute("UPDATE meta SET value = ? WHERE key = ?", (generation, self.table("generation")))

    def put_fact(self, key: str, value):
        self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (self.table(key), json.dumps(value)))

    def drop_facts(self, *keys: str):
        self.db.execute(f"DELETE FROM state WHERE key IN ({','.join('?' * len(keys))})",
                        [self.table(k) for k in keys])

    def drop_originals(self):
        self.db.execute(f"DELETE FROM {self.table('originals')}")

    # ---- the refine queue (fast ingest) -----------------------------------------------------------
    def queue(self, ids, x: np.ndarray, seq: int):
        self.db.executemany(f"INSERT OR REPLACE INTO {self.table('refine')} (id, seq, vector) VALUES (?, ?, ?)",
                            [(i, seq, v.tobytes()) for i, v in zip(ids, x)])

    def unqueue(self, ids) -> int:
        """Drop the queue rows of `ids`; returns how many."""
        return delete_in(self.db, self.table("refine"), ids)

    def unqueue_all(self):
        self.db.execute(f"DELETE FROM {self.table('refine')}")

    def refine_codes(self, rows: list[tuple[int, int]], codes: np.ndarray, seq: int) -> tuple[list[bool], int]:
        """Better codes for queued (id, seq) rows, where the vector was not rewritten or deleted
        since; the rows leave the queue.  Returns which were written and how many left."""
        codes_table, refine = self.table("codes"), self.table("refine")
        done = [self.db.execute(f"UPDATE {codes_table} SET codes = ?, seq = ? WHERE id = ? AND seq = ?",
                                (c.tobytes(), seq, i, s)).rowcount == 1 for (i, s), c in zip(rows, codes)]
        removed = self.db.executemany(f"DELETE FROM {refine} WHERE id = ? AND seq = ?", rows).rowcount
        return done, removed

    # ---- what opening reads (writer's connection, before any thread starts) -------------------------
    def generation(self) -> int:
        return self.db.execute("SELECT value FROM meta WHERE key = ?", (self.table("generation"),)).fetchone()[0]

    def facts(self) -> dict:
        """This space's lifecycle facts, by their unscoped keys."""
        keys = {self.table(k): k for k in ("job", "last_error", "paused", "model")}
        return {keys[k]: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM state") if k in keys}

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT count(*) FROM {self.table(table)}").fetchone()[0]

    def changed_ids(self, seq: int) -> list[int]:
        """Ids whose vector was written or deleted after `seq`."""
        return [r[0] for r in self.db.execute(
            f"SELECT id FROM {self.table('codes')} WHERE seq > ? UNION SELECT id FROM {self.table('deleted')} "
            f"WHERE seq > ?", (seq, seq))]

    def codes_after(self, seq: int, width: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, codes) of the vectors written after `seq`, in batches."""
        rows = self.db.execute(f"SELECT id, codes FROM {self.table('codes')} WHERE seq > ? ORDER BY id", (seq,))
        while batch := rows.fetchmany(READ_ROWS):
            yield np.array([r[0] for r in batch], dtype=np.int64), array_of([r[1] for r in batch], np.int32, width)

    def all_originals(self, d: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = self.db.execute(f"SELECT id, vector FROM {self.table('originals')} ORDER BY id")
        while batch := rows.fetchmany(READ_ROWS):
            yield np.array([r[0] for r in batch], dtype=np.int64), array_of([r[1] for r in batch], np.float32, d)

    # ---- reads (any thread, no lock) ---------------------------------------------------------------
    def originals(self, ids) -> dict[int, np.ndarray]:
        """The stored original vectors of `ids` (absent ones skipped)."""
        with self.record.reading() as db:
            rows = select_by_ids(db, self.table("originals"), "vector", ids)
        if not rows:
            return {}
        return dict(zip([i for i, _ in rows], array_of([v for _, v in rows], np.float32, -1)))

    def queued(self, limit: int) -> list[tuple[int, int, bytes]]:
        """The oldest (id, seq, vector) rows of the refine queue."""
        with self.record.reading() as db:
            return db.execute(f"SELECT id, seq, vector FROM {self.table('refine')} ORDER BY seq, id LIMIT ?",
                              (limit,)).fetchall()

    def originals_written_after(self, seq: int, d: int, writer: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """ids and originals of the vectors written after `seq`, and the current seq, read together
        (on this thread's reader, or on the writer's connection: write lock held)."""
        if writer:
            return self._originals_after(self.db, seq, d)
        with self.record.reading() as db:
            return self._originals_after(db, seq, d)

    def _originals_after(self, db: sqlite3.Connection, seq: int, d: int) -> tuple[np.ndarray, np.ndarray, int]:
        db.execute("BEGIN")
        try:
            now = last_seq(db)
            rows = db.execute(f"SELECT c.id, o.vector FROM {self.table('codes')} c JOIN {self.table('originals')} o "
                              f"ON o.id = c.id WHERE c.seq > ? ORDER BY c.id", (seq,)).fetchall()
        finally:
            db.execute("COMMIT")
        return np.array([r[0] for r in rows], dtype=np.int64), array_of([r[1] for r in rows], np.float32, d), now
