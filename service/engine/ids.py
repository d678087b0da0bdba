"""Point ids: Qdrant's are unsigned integers or UUIDs; the index and SQLite key points by int64.

Integer ids stay as they are (0 <= id < UUID_BASE).  The k-th UUID a collection sees gets the
internal id base + k (base = UUID_BASE, or past any older integer id at or above it), durably
(table `uuids`, written in the transaction of its first upsert), and keeps it after a delete, so
a re-upsert, a scroll offset or a `has_id` condition on it still resolves to the same point.  In
memory the UUIDs are one growing (n, 16) byte buffer (16 bytes per UUID point, for the id -> UUID
direction of every answer); UUID -> id look-ups go to SQLite's primary-key index.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import uuid

import numpy as np
from pyroaring import BitMap64

from model.lists import is_in_sorted

from .sql import array_of, select_in

UUID_BASE = 1 << 62
MAX_INT_ID = UUID_BASE - 1  # integer point ids are 0 .. MAX_INT_ID; the internal ids above are UUIDs'
INT_ID_RANGE = "[0, 2^62)"  # the same, as messages say it
MIN_JUDGED = 1 << 12  # ids added before the point set judges its form again (a few hundred KB at most)
DENSE_CHUNKS = 20  # ids a 64K-id chunk of a bitmap must hold on average to cost less than 8 bytes each
SCHEMA = "CREATE TABLE IF NOT EXISTS uuids (uuid BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;"


class UnknownId(KeyError):
    """A UUID this collection never stored."""


def parse_uuid(text: str) -> str:
    """A UUID in its canonical form (lower case, hyphenated)."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ValueError("point ids are non-negative integers or UUIDs (e.g. "
                         "'5c56c793-69f3-4fbf-87e6-c4bf54c28c26')") from None


def canonical_ids(ids) -> list:
    """Client ids as Python ints and canonical UUID strings."""
    return [parse_uuid(i) if isinstance(i, str) else int(i) for i in ids]


def is_int_id(i) -> bool:
    return 0 <= i <= MAX_INT_ID


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
                      for t in ("points", "deleted", "original_rows"))
            self.base = max(UUID_BASE, top + 1)
        self._buffer = array_of([u for _, u in rows], np.uint8, 16).copy()
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
        rows = select_in(db, "uuids", "uuid, id", "uuid", [uuid.UUID(u).bytes for u in uuids])
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
            rows = array_of([uuid.UUID(u).bytes for u in new], np.uint8, 16)
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


class PointSet:
    """The ids of a collection's stored points, as a roaring bitmap (pyroaring.BitMap64): a few
    bits a point for ids that come in runs (sequential integers, UUIDs' internal ids), 2-4 bytes
    for integers scattered below 2^32.  Ids so scattered that the bitmap would cost more than a
    sorted int64 array (8 bytes a point; e.g. random 62-bit integers: ~120 bytes each in a
    bitmap) are held as that array instead: judged on the ids at the start, then each time as
    many ids have been added as were held at the last judgement.  One lock guards either:
    searches check their hits without the index lock, and a bitmap must not change under a reader."""

    def __init__(self, ids: np.ndarray):
        self._lock = threading.Lock()
        self._bitmap: BitMap64 | None = None
        self._buffer = np.unique(np.asarray(ids, dtype=np.int64))  # the array form: ids in [:_n], sorted
        self._n = len(self._buffer)
        self._judged_at, self._added = 0, 0  # the count at the last judgement, ids added since
        self._judge()

    def _count(self) -> int:
        return len(self._bitmap) if self._bitmap is not None else self._n

    def _judge(self):
        """Hold the ids in the form that costs less (lock held)."""
        n = self._judged_at = self._count()
        self._added = 0
        if self._bitmap is not None:
            chunks = self._bitmap.get_statistics()["n_containers"]
        else:
            chunks = 1 + np.count_nonzero(np.diff(self._buffer[:n] >> 16)) if n else 0
        dense = chunks * DENSE_CHUNKS <= n
        if not dense and self._bitmap is not None:
            self._buffer = ids_of(self._bitmap).copy()
            self._n, self._bitmap = len(self._buffer), None
        elif dense and self._bitmap is None:
            self._bitmap = BitMap64(self._buffer[:n].view(np.uint64))
            self._buffer, self._n = np.zeros(0, np.int64), 0

    def _counted(self, added: int):
        self._added += added
        if self._added >= max(MIN_JUDGED, self._judged_at):
            self._judge()

    @property
    def ids(self) -> np.ndarray:
        """Every id, ascending: an array no write changes (the array form's writes append past it
        or replace it)."""
        with self._lock:
            return self._buffer[:self._n] if self._bitmap is None else ids_of(self._bitmap)

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def page(self, start: int | None, n: int) -> list[int]:
        """The first n ids at or after `start` (None: from the first), ascending."""
        with self._lock:
            if self._bitmap is None:
                return page_of(self._buffer[:self._n], start, n)
            it = self._bitmap.iter_equal_or_larger(max(start, 0)) if start is not None else iter(self._bitmap)
            return list(itertools.islice(it, n))

    def contains(self, ids) -> np.ndarray:
        """A bool mask over `ids`: which are stored points."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock:
            if self._bitmap is None:
                return is_in_sorted(ids, self._buffer[:self._n])
            held = self._bitmap & BitMap64(ids[ids >= 0].view(np.uint64))
        return is_in_sorted(ids, ids_of(held))

    def add(self, ids):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        with self._lock:
            if self._bitmap is not None:
                before = len(self._bitmap)
                self._bitmap.update(ids.view(np.uint64))
                return self._counted(len(self._bitmap) - before)
            held = self._buffer[:self._n]
            new = ids[~is_in_sorted(ids, held)]
            if not len(new):
                return
            if self._n and new[0] <= held[-1]:  # among the stored ones: a new array
                self._buffer = np.insert(held, np.searchsorted(held, new), new)
            else:  # above them all: appended in place (the buffer doubles; its unused end costs no RAM)
                if self._n + len(new) > len(self._buffer):
                    grown = np.empty(max(2 * len(self._buffer), self._n + len(new), 1024), dtype=np.int64)
                    grown[:self._n] = held
                    self._buffer = grown
                self._buffer[self._n:self._n + len(new)] = new
            self._n += len(new)
            self._counted(len(new))

    def remove(self, ids):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[ids >= 0]
        with self._lock:
            if self._bitmap is not None:
                self._bitmap.difference_update(BitMap64(ids.view(np.uint64)))
            else:
                self._buffer = self._buffer[:self._n][~is_in_sorted(self._buffer[:self._n], ids)]
                self._n = len(self._buffer)
            self._judged_at = min(self._judged_at, self._count())


def ids_of(bitmap: BitMap64) -> np.ndarray:
    """A bitmap's ids, ascending, as int64 (internal ids are below 2^63)."""
    return np.frombuffer(bitmap.to_array(), dtype=np.int64)


def page_of(ids: np.ndarray, start: int | None, n: int) -> list[int]:
    """The first n of sorted `ids` at or after `start` (None: from the first)."""
    i = np.searchsorted(ids, start) if start is not None else 0
    return ids[i:i + n].tolist()
