"""A vector space's tables in the collection's record (engine/record.py lists them): its codes,
deletes, original rows and refine queue, its generation and lifecycle facts; its originals file
(engine/originals.py); and the read-only reads of a training job's worker."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import Unavailable
from .originals import OriginalsFile, file_path, read_rows
from .row_runs import RowRuns, RowRunsAsOf
from .sql import READ_ROWS, array_of, blobs_of, delete_in, last_seq, select_by_ids

log = logging.getLogger("qinco.store")

if TYPE_CHECKING:  # annotations only: the record imports this module
    from .record import Record


def space_schema(space: int) -> str:
    """The tables of vector space `space` (engine/record.py lists them)."""
    s = scoped("", space)
    return f"""
CREATE TABLE IF NOT EXISTS codes{s} (id INTEGER PRIMARY KEY, codes BLOB NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS codes{s}_seq ON codes{s}(seq);
CREATE TABLE IF NOT EXISTS deleted{s} (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS original_rows{s} (id INTEGER PRIMARY KEY, row INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS refine{s} (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS refine{s}_order ON refine{s}(seq, id);
INSERT OR IGNORE INTO meta VALUES ('generation{s}', 0);
INSERT OR IGNORE INTO meta VALUES ('originals_file{s}', 0);
INSERT OR IGNORE INTO meta VALUES ('originals_rows{s}', 0);
INSERT OR IGNORE INTO meta VALUES ('original_rows_version{s}', 0);
"""


def scoped(name: str, space: int) -> str:
    """A table, meta or state key of vector space `space`: space 0's keep the names that records
    written before named vectors have."""
    return name if space == 0 else f"{name}_{space}"


# ---- what the training worker reads (read-only, in its own process) -------------------------------
def check_originals_scope(scope: str) -> str:
    """A space's originals named by a job's request (read from its file): 'originals' or 'originals_k'."""
    if not re.fullmatch(r"originals(_[0-9]{1,3})?", scope):
        raise ValueError(f"not a space's originals: {scope!r}")
    return scope


def _originals_in(db: sqlite3.Connection, folder: Path, request: dict) -> tuple[str, Path]:
    """The table of id -> row and the file of the space that `request` names (in a read transaction)."""
    scope = check_originals_scope(request.get("originals", "originals"))
    suffix = scope[len("originals"):]
    generation = db.execute("SELECT value FROM meta WHERE key = ?", (f"originals_file{suffix}",)).fetchone()[0]
    return f"original_rows{suffix}", file_path(folder, scope, generation, request.get("datatype", "float32"))


def ids_and_rows(rows: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(id, row) pairs read from an `original_rows` table -> the ids and the rows, as arrays."""
    both = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return both[:, 0], both[:, 1]


def sample_originals(db: sqlite3.Connection, folder: Path, request: dict, n: int, seed: int) -> np.ndarray:
    """Up to n original vectors chosen at random, in one read transaction (points deleted
    meanwhile cannot leave holes): training never loads a whole large collection."""
    db.execute("BEGIN")
    try:
        table, path = _originals_in(db, folder, request)
        rows = np.array(db.execute(f"SELECT row FROM {table} ORDER BY id").fetchall(), dtype=np.int64).ravel()
        if len(rows) > n:
            rows = np.sort(rows[np.random.default_rng(seed).choice(len(rows), n, replace=False)])
        return read_rows(path, request["d"], request.get("datatype", "float32"), rows)
    finally:
        db.execute("COMMIT")


@contextlib.contextmanager
def originals_as_of_now(db: sqlite3.Connection, folder: Path, request: dict, chunk: int):
    """(seq, count, batches of (ids, vectors) in id order): every original as of one sequence
    number, read in one transaction (writes after `seq` are the server's to catch up)."""
    db.execute("BEGIN")
    try:
        seq = last_seq(db)
        table, path = _originals_in(db, folder, request)
        total = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        cursor = db.execute(f"SELECT id, row FROM {table} ORDER BY id")

        def batches():
            while batch := cursor.fetchmany(chunk):
                ids, rows = ids_and_rows(batch)
                yield ids, read_rows(path, request["d"], request.get("datatype", "float32"), rows)
        yield seq, total, batches()
    finally:
        db.execute("COMMIT")


class SpaceRecord:
    """The tables of one vector space (see the module's docstring), on the record's connections."""

    def __init__(self, record: Record, k: int, meta: dict):
        """meta: the space's entry in collection.json; one with a `size` trains its own model and
        may keep originals (its `datatype`, float32 by default)."""
        self.record, self.k = record, k
        self.file: OriginalsFile | None = None
        self._next_file: OriginalsFile | None = None  # the next generation's, written in this transaction
        self.row_runs: RowRunsAsOf | None = None  # None: no originals, or too scattered for runs
        self._changes: list[tuple[np.ndarray, np.ndarray | None] | None] = []  # this transaction's (None: all rows)
        if meta.get("size"):
            self.file = OriginalsFile(record.path.parent, self.table("originals"), meta["size"],
                                      meta.get("datatype", "float32"), self.meta("originals_file"),
                                      self.meta("originals_rows"))
            self.file.remove_others()
            self.row_runs = self._runs_after([None])

    def table(self, name: str) -> str:
        return scoped(name, self.k)

    @property
    def db(self) -> sqlite3.Connection:
        return self.record.db

    # ---- writes (write lock held, in the record's transaction) -------------------------------------
    def put_codes(self, ids, codes: list[bytes], seq: int):
        self.db.executemany(f"INSERT OR REPLACE INTO {self.table('codes')} (id, codes, seq) VALUES (?, ?, ?)",
                            [(i, c, seq) for i, c in zip(ids, codes)])

    def put_originals(self, ids, x: np.ndarray) -> np.ndarray:
        """Originals appended to the file (durable before the commit: `before_commit`), mapped by
        id; returns their rows."""
        rows = self.file.append(x)
        ids = [int(i) for i in ids]
        self.db.executemany(f"INSERT OR REPLACE INTO {self.table('original_rows')} (id, row) VALUES (?, ?)",
                            zip(ids, rows.tolist()))
        self._changes.append((np.array(ids, dtype=np.int64), rows))
        return rows

    def delete_vectors(self, ids: list[int], seq: int) -> int:
        """The vectors of `ids` in this space (codes, original, queue row), recorded as deleted at
        `seq`; returns how many queue rows went."""
        delete_in(self.db, self.table("codes"), ids)
        if delete_in(self.db, self.table("original_rows"), ids):
            self._changes.append((np.array([int(i) for i in ids], dtype=np.int64), None))
        self.db.executemany(f"INSERT OR REPLACE INTO {self.table('deleted')} (id, seq) VALUES (?, ?)",
                            [(int(i), seq) for i in ids])
        return self.unqueue(ids)

    def set_codes(self, ids, codes: np.ndarray):
        """Every point's codes (a swap): the rows made one at a time, not a list of millions of
        Python objects (150 bytes a point at once, and a fragmented heap after)."""
        self.db.executemany(f"UPDATE {self.table('codes')} SET codes = ? WHERE id = ?",
                            ((blob, int(i)) for blob, i in zip(blobs_of(codes), ids)))

    def set_generation(self, generation: int):
        self.set_meta("generation", generation)

    def put_fact(self, key: str, value):
        self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (self.table(key), json.dumps(value)))

    def drop_facts(self, *keys: str):
        self.db.execute(f"DELETE FROM state WHERE key IN ({','.join('?' * len(keys))})",
                        [self.table(k) for k in keys])

    def drop_originals(self):
        """Every original: the rows go, and the commit switches to the next generation's empty file."""
        self.db.execute(f"DELETE FROM {self.table('original_rows')}")
        self._changes.append(None)
        self._switch_file()

    def compact_originals(self) -> OriginalsFile:
        """Copy the mapped rows, in id order, to the next generation's file, and map ids to them
        (row = rank of the id): the rows of replaced and deleted vectors go.  Returns the new
        file (the record's once the transaction commits)."""
        f, table = self.file, self.table("original_rows")
        new = self._switch_file()
        rows = self.db.execute(f"SELECT row FROM {table} ORDER BY id")
        while batch := rows.fetchmany(READ_ROWS):
            new.append(f.read(np.array(batch, dtype=np.int64).ravel()))
        self.db.execute(f"CREATE TABLE {table}_new (id INTEGER PRIMARY KEY, row INTEGER NOT NULL)")
        self.db.execute(f"INSERT INTO {table}_new SELECT id, ROW_NUMBER() OVER (ORDER BY id) - 1 FROM {table}")
        self.db.execute(f"DROP TABLE {table}")
        self.db.execute(f"ALTER TABLE {table}_new RENAME TO {table}")
        self._changes.append(None)
        return new

    def dead_originals(self) -> int:
        """Rows of the originals file that no id maps to (replaced or deleted vectors)."""
        return self.file.rows - self.count("original_rows") if self.file is not None else 0

    def _switch_file(self) -> OriginalsFile:
        f = self.file
        self._next_file = OriginalsFile(f.path.parent, self.table("originals"), f.d, f.datatype, f.generation + 1, 0)
        self.set_meta("originals_file", f.generation + 1)
        return self._next_file

    # ---- the originals file and the record's transaction (record.Record.transaction) ---------------
    def before_commit(self):
        f = self._next_file or self.file
        if f is not None and f.end != f.rows:
            f.sync()
        if f is not None and (f.end != f.rows or f is self._next_file):
            self.set_meta("originals_rows", f.end)
        if self._changes:
            self.db.execute("UPDATE meta SET value = value + 1 WHERE key = ?", (self.table("original_rows_version"),))

    def committed(self):
        """After the commit; cannot fail (the record's other spaces commit after it)."""
        changes, self._changes = self._changes, []
        if changes:
            self.row_runs = self._runs_after(changes)
        if self._next_file is not None:
            self.file, self._next_file = self._next_file, None
            self.file.committed()
            try:
                self.file.remove_others()
            except OSError:  # removed at the next open
                log.exception("%s: the originals files of other generations were not removed", self.record.name)
        elif self.file is not None:
            self.file.committed()

    def began(self):
        self._changes = []  # a transaction's own only, whatever the last one's end

    def rolled_back(self):
        self._changes = []
        if self._next_file is not None:
            self._next_file.path.unlink(missing_ok=True)
            self._next_file = None
        if self.file is not None:
            self.file.rolled_back()

    def _runs_after(self, changes: list) -> RowRunsAsOf | None:
        """The row runs once a transaction's changes are applied, on the writer's connection (at
        open, or write lock held); a table rewritten (None) is read again.  None: SQLite answers."""
        try:
            version = self.meta("original_rows_version")
            if any(c is None for c in changes):
                runs = RowRuns.empty()
                for batch in self._rows_in_id_order():  # stops once past MAX_RUNS
                    if (runs := runs.with_changes(*batch)) is None:
                        return None
                return RowRunsAsOf(self.meta("originals_file"), version, runs)
            known = self.row_runs
            if known is None or known.version != version - 1:  # not as of before this transaction
                return None
            runs = known.runs
            for ids, rows in changes:
                if (runs := runs.with_changes(ids, rows)) is None:
                    return None
            return RowRunsAsOf(known.generation, version, runs)
        except Exception:  # SQLite answers for them from now on
            log.exception("%s: the originals' row runs were dropped", self.record.name)
            return None

    def move_blob_originals(self):
        """A record written before the originals file kept them as blobs in `originals`: move them
        to the file, in one transaction, once (record.Record opens every space first)."""
        legacy = self.table("originals")
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (legacy,)).fetchone():
            return
        with self.record.transaction():
            last = -1 << 62
            while batch := self.db.execute(f"SELECT id, vector FROM {legacy} WHERE id > ? ORDER BY id LIMIT ?",
                                           (last, READ_ROWS)).fetchall():
                self.put_originals([i for i, _ in batch], array_of([v for _, v in batch], np.float32, self.file.d))
                last = batch[-1][0]
            self.db.execute(f"DROP TABLE {legacy}")

    def set_meta(self, key: str, value: int):
        self.db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, self.table(key)))

    def meta(self, key: str, db: sqlite3.Connection | None = None) -> int:
        """One of this space's meta values (on the writer's connection, or on `db`)."""
        return (db or self.db).execute("SELECT value FROM meta WHERE key = ?", (self.table(key),)).fetchone()[0]

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
        return self.meta("generation")

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

    def original_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every kept original in the current file, in id order (write lock, or
        at open)."""
        batches = list(self._rows_in_id_order())
        if not batches:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return tuple(np.concatenate(part) for part in zip(*batches))

    def _rows_in_id_order(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cursor = self.db.execute(f"SELECT id, row FROM {self.table('original_rows')} ORDER BY id")
        while batch := cursor.fetchmany(READ_ROWS):
            yield ids_and_rows(batch)

    # ---- reads (any thread, no lock) ---------------------------------------------------------------
    def originals(self, ids) -> dict[int, np.ndarray]:
        """The stored original vectors of `ids` (absent ones skipped)."""
        def select(db, generation: int) -> tuple[np.ndarray, np.ndarray]:
            known = self.row_runs
            if known is not None and known.generation == generation \
                    and known.version == self.meta("original_rows_version", db):
                return known.runs.lookup(np.asarray(ids, dtype=np.int64))
            return ids_and_rows(select_by_ids(db, self.table("original_rows"), "row", ids))
        found, x = self._read_originals(select)
        return dict(zip(found.tolist(), x))

    def _read_originals(self, select, db: sqlite3.Connection | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, originals) of the (ids, rows) that `select(conn, generation)` reads, in one read
        transaction with the file's generation (on this thread's reader, or on `db`)."""
        if self.file is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        for _ in range(1000):  # a drop that commits between the read and the file swap: read again
            with (contextlib.nullcontext(db) if db is not None else self.record.reading()) as conn:
                conn.execute("BEGIN")
                try:
                    generation = self.meta("originals_file", conn)
                    ids, rows = select(conn, generation)
                finally:
                    conn.execute("COMMIT")
            f = self.file
            if f.generation == generation:
                return ids, f.read(rows)
            time.sleep(0.001)
        raise Unavailable(f"the originals of {self.table('originals')} are being replaced: try again")

    def queued(self, limit: int) -> list[tuple[int, int, bytes]]:
        """The oldest (id, seq, vector) rows of the refine queue."""
        with self.record.reading() as db:
            return db.execute(f"SELECT id, seq, vector FROM {self.table('refine')} ORDER BY seq, id LIMIT ?",
                              (limit,)).fetchall()

    def originals_written_after(self, seq: int, writer: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """ids and originals of the vectors written after `seq`, and the current seq, read together
        (on this thread's reader, or on the writer's connection: write lock held)."""
        now = []

        def select(db, generation: int):
            now.append(last_seq(db))
            return ids_and_rows(db.execute(
                f"SELECT c.id, o.row FROM {self.table('codes')} c JOIN {self.table('original_rows')} o "
                f"ON o.id = c.id WHERE c.seq > ? ORDER BY c.id", (seq,)).fetchall())
        ids, x = self._read_originals(select, self.db if writer else None)
        return ids, x, now[-1]
