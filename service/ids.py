"""Point ids: Qdrant's are unsigned integers or UUIDs; the index and SQLite key points by int64.

Integer ids stay as they are (0 <= id < UUID_BASE).  The n-th UUID a collection sees gets the
internal id UUID_BASE + n, durably (table `uuids`, written in the transaction of its first
upsert), and keeps it after a delete, so a re-upsert, a scroll offset or a `has_id` condition
on it still resolves to the same point.  In memory the UUIDs are one (n, 16) byte array (16
bytes per UUID point, for the id -> UUID direction of every answer); UUID -> id look-ups go to
SQLite's primary-key index.
"""

from __future__ import annotations

import sqlite3
import uuid

import numpy as np

UUID_BASE = 1 << 62
SCHEMA = "CREATE TABLE IF NOT EXISTS uuids (uuid BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;"


class UnknownId(KeyError):
    """A UUID this collection never stored."""


class PointIds:
    def __init__(self, db: sqlite3.Connection):
        db.executescript(SCHEMA)
        rows = db.execute("SELECT id, uuid FROM uuids ORDER BY id").fetchall()
        table = np.zeros((rows[-1][0] - UUID_BASE + 1 if rows else 0, 16), dtype=np.uint8)
        for i, u in rows:
            table[i - UUID_BASE] = np.frombuffer(u, dtype=np.uint8)
        self.table = table  # replaced, never changed in place: readers need no lock

    @property
    def count(self) -> int:
        return len(self.table)

    def external(self, i: int) -> int | str:
        """The id a client sees for internal id i."""
        i = int(i)
        if i < UUID_BASE:
            return i
        return str(uuid.UUID(bytes=self.table[i - UUID_BASE].tobytes()))

    def lookup(self, db: sqlite3.Connection, ids) -> dict:
        """{client id: internal id} for the ids that resolve (integers always; UUIDs once stored)."""
        out = {i: i for i in ids if isinstance(i, (int, np.integer))}
        uuids = list({i for i in ids if isinstance(i, str)})
        for i0 in range(0, len(uuids), 900):
            chunk = uuids[i0:i0 + 900]
            rows = db.execute(f"SELECT uuid, id FROM uuids WHERE uuid IN ({','.join('?' * len(chunk))})",
                              [uuid.UUID(u).bytes for u in chunk]).fetchall()
            out.update((str(uuid.UUID(bytes=u)), i) for u, i in rows)
        return out

    def internal(self, db: sqlite3.Connection, ids, strict: bool) -> list[int]:
        """Internal ids of `ids` in order; an unknown UUID raises UnknownId (strict) or is left out."""
        if all(isinstance(i, (int, np.integer)) for i in ids):
            return [int(i) for i in ids]
        found = self.lookup(db, ids)
        if strict:
            missing = next((i for i in ids if i not in found), None)
            if missing is not None:
                raise UnknownId(missing)
        return [found[i] for i in ids if i in found]

    def assign(self, db: sqlite3.Connection, ids) -> tuple[list[int], list[bytes]]:
        """Internal ids for an upsert, new UUIDs numbered after the known ones (call in the write
        transaction); returns them and the new UUIDs, for `added` once the transaction commits."""
        found = self.lookup(db, ids)
        new: list[bytes] = []
        out = []
        for i in ids:
            if i not in found:
                found[i] = UUID_BASE + self.count + len(new)
                new.append(uuid.UUID(i).bytes)
                db.execute("INSERT INTO uuids (uuid, id) VALUES (?, ?)", (new[-1], found[i]))
            out.append(int(found[i]))
        return out, new

    def added(self, new: list[bytes]):
        if new:
            self.table = np.concatenate([self.table, np.frombuffer(b"".join(new), dtype=np.uint8).reshape(-1, 16)])


def canonical(ids) -> list:
    """Client ids as Python ints and canonical UUID strings (lower case, hyphenated)."""
    out = []
    for i in ids:
        if isinstance(i, str):
            try:
                out.append(str(uuid.UUID(i)))
            except ValueError:
                raise ValueError(f"point ids are non-negative integers or UUIDs; {i[:64]!r} is neither") from None
        else:
            out.append(int(i))
    return out
