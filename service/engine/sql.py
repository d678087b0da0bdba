"""SQLite helpers shared by the record's modules: connections, reads by id in bounded chunks, and
blobs to arrays."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import numpy as np

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


def array_of(blobs: list[bytes], dtype, width: int) -> np.ndarray:
    """Blobs of one row each -> an (n, width) array (vectors: float32; codes: int32; UUIDs: uint8)."""
    return np.frombuffer(b"".join(blobs), dtype=dtype).reshape(len(blobs), width)


def blobs_of(codes: np.ndarray, chunk: int = 65_536) -> Iterator[bytes]:
    """Each row of an (n, width) code array as the int32 bytes a codes column holds, converted a
    chunk at a time: a swap of millions of rows makes neither a list of them nor an int32 copy."""
    for i0 in range(0, len(codes), chunk):
        for row in codes[i0:i0 + chunk].astype(np.int32):
            yield row.tobytes()


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
