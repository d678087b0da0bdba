"""Point ids: Qdrant's are unsigned integers or UUIDs; the index and SQLite key points by int64.

Integer ids stay as they are (0 <= id < UUID_BASE).  The k-th UUID a collection sees gets the
internal id base + k (base = UUID_BASE, or past any older integer id at or above it), durably
(table `uuids`, written in the transaction of its first upsert), and keeps it after a delete, so
a re-upsert, a scroll offset or a `has_id` condition on it still resolves to the same point.  In
memory the UUIDs are one growing (n, 16) byte buffer (16 bytes per UUID point, for the id -> UUID
direction of every answer); UUID -> id look-ups go to SQLite's primary-key index.
"""

from __future__ import annotations

import sqlite3
import uuid

import numpy as np

UUID_BASE = 1 << 62
SCHEMA = "CREATE TABLE IF NOT EXISTS uuids (uuid BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;"


class UnknownId(KeyError):
    """A UUID this collection never stored."""


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


class PointIds:
    def __init__(self, db: sqlite3.Connection):
        db.executescript(SCHEMA)
        rows = db.execute("SELECT id, uuid FROM uuids ORDER BY id").fetchall()
        if rows:
            self.base = rows[0][0]
            if rows[-1][0] - self.base != len(rows) - 1:
                raise ValueError("the uuids table is not numbered consecutively")
        else:  # integer ids at or above UUID_BASE (written by older versions) stay integers
            top = max(db.execute(f"SELECT COALESCE(MAX(id), -1) FROM {t}").fetchone()[0]
                      for t in ("points", "deleted", "originals"))
            self.base = max(UUID_BASE, top + 1)
        self._buffer = np.frombuffer(b"".join(u for _, u in rows), dtype=np.uint8).reshape(-1, 16).copy()
        self.count = len(rows)  # rows of the buffer in use; readers read it before the buffer

    def external(self, i: int) -> int | str:
        """The id a client sees for internal id i."""
        k = int(i) - self.base
        n = self.count
        if not 0 <= k < n:
            return int(i)
        return str(uuid.UUID(bytes=self._buffer[k].tobytes()))

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
        found = self.lookup(db, ids)
        if strict:
            missing = next((i for i in ids if i not in found), None)
            if missing is not None:
                raise UnknownId(missing)
        return [found[i] for i in ids if i in found]

    def assign(self, db: sqlite3.Connection, ids) -> tuple[list[int], int]:
        """Internal ids for an upsert, inside its write transaction (write lock held): new UUIDs are
        numbered after the known ones and visible to `external` at once, since SQLite readers see
        them as soon as the transaction commits.  Returns the ids and the count to `restore` if the
        transaction rolls back."""
        found = self.lookup(db, ids)
        before = self.count
        new = [i for i in dict.fromkeys(ids) if i not in found]
        for k, u in enumerate(new):
            found[u] = self.base + before + k
        if new:
            db.executemany("INSERT INTO uuids (uuid, id) VALUES (?, ?)", [(uuid.UUID(u).bytes, found[u]) for u in new])
            rows = np.frombuffer(b"".join(uuid.UUID(u).bytes for u in new), dtype=np.uint8).reshape(-1, 16)
            if before + len(new) > len(self._buffer):  # grow by doubling: appends cost O(1) amortised
                grown = np.zeros((max(2 * len(self._buffer), before + len(new), 1024), 16), dtype=np.uint8)
                grown[:before] = self._buffer[:before]
                self._buffer = grown
            self._buffer[before:before + len(new)] = rows
            self.count = before + len(new)
        return [int(found[i]) for i in ids], before

    def restore(self, count: int):
        """Forget the UUIDs numbered after `count` (their transaction rolled back)."""
        self.count = count
