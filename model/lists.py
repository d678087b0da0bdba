"""The inverted lists of an index: one copy of the codes, in the layout the scan reads.

Every list's rows live in one arena: codes (rows, code bytes) uint8 and ids (rows,) int64,
list l at rows starts[l] : starts[l] + sizes[l], with room for capacity[l] rows.  A list
that outgrows its room moves to the arena's end with twice the room it needs (the arena
doubles when full: pages past the rows written are never touched, so they cost no RAM);
the rows it leaves are a hole (id -1) until `compact` packs every list back to back.
A point thus costs its code and its 8-byte id, as in faiss's IVF lists, and nothing else.

Not thread-safe: the service changes it under its index write lock, searches read it under
the read lock.
"""

from __future__ import annotations


import zipfile

import numpy as np

MIN_ROOM = 16  # rows a list gets when it first moves
SLACK = 0.25  # compact once holes exceed this share of the arena in use
ROOM = 8  # compaction leaves each list room for 1/ROOM more rows (the next writes move few lists)
RUN_ROWS = 1 << 20  # rows a whole-store copy moves per step: its temporaries stay ~30 MB at any size


def starts_of(sizes: np.ndarray) -> np.ndarray:
    """Where each of these runs of rows starts when they are laid back to back (int64)."""
    return (np.cumsum(sizes) - sizes).astype(np.int64)


class ListStore:
    def __init__(self, nlist: int, code_size: int, sizes: np.ndarray | None = None,
                 codes: np.ndarray | None = None, ids: np.ndarray | None = None):
        """Empty, or lists back to back (sizes (nlist,), codes and ids in list order)."""
        self.nlist, self.code_size = nlist, code_size
        self.sizes = np.zeros(nlist, np.int64) if sizes is None else np.asarray(sizes, np.int64).copy()
        self.capacity = self.sizes.copy()
        self.starts = starts_of(self.sizes)
        n = int(self.sizes.sum())
        self.codes = np.empty((0, code_size), np.uint8) if codes is None else np.ascontiguousarray(codes, np.uint8)
        self.ids = np.empty(0, np.int64) if ids is None else np.ascontiguousarray(ids, np.int64)
        if len(self.codes) != n or len(self.ids) != n:
            raise ValueError(f"lists of {n} rows, but {len(self.codes)} codes and {len(self.ids)} ids")
        self.end = n  # rows of the arena in use (lists, their room, holes)
        self.holes = 0  # rows of the arena left by lists that moved
        self.max_id = int(self.ids.max()) if n else -1  # no stored id is larger: larger ones need no look-up
        self.version = 0  # changes with every write: caches keyed on it
        self._by_start: tuple | None = None  # (version, non-empty lists by start, their starts)

    @property
    def ntotal(self) -> int:
        return int(self.sizes.sum())

    # ---- writing -----------------------------------------------------------------------------
    def add(self, lists: np.ndarray, packed: np.ndarray, ids: np.ndarray) -> None:
        """Append rows: list numbers (n,), codes (n, code bytes), ids (n,) not stored yet."""
        lists = np.asarray(lists, np.int64)
        if not len(lists):
            return
        order = np.argsort(lists, kind="stable")
        lists, packed, ids = lists[order], packed[order], np.asarray(ids, np.int64)[order]
        touched, first, count = np.unique(lists, return_index=True, return_counts=True)
        for l in touched[self.sizes[touched] + count > self.capacity[touched]]:
            self._move(int(l), int(self.sizes[l] + count[np.searchsorted(touched, l)]))
        rank = np.arange(len(lists)) - np.repeat(first, count)
        rows = self.starts[lists] + self.sizes[lists] + rank
        self.codes[rows], self.ids[rows] = packed, ids
        self.sizes[touched] += count
        self.max_id = max(self.max_id, int(ids.max()))
        self.version += 1

    def _move(self, l: int, need: int) -> None:
        """Give list l room for `need` rows: where it is if it ends the arena, else at the end.
        Rows of room hold id -1 until written."""
        room = max(MIN_ROOM, 2 * need)
        s, n, cap = int(self.starts[l]), int(self.sizes[l]), int(self.capacity[l])
        if s + cap == self.end and cap:  # the last list grows in place
            if s + room > len(self.ids):
                self._grow(s + room)
            self.ids[s + cap:s + room] = -1
            self.capacity[l], self.end = room, s + room
            return
        if self.end + room > len(self.ids):
            self._grow(self.end + room)
        self.codes[self.end:self.end + n] = self.codes[s:s + n]
        self.ids[self.end:self.end + n] = self.ids[s:s + n]
        self.ids[self.end + n:self.end + room] = -1
        self.ids[s:s + cap] = -1  # a hole
        self.holes += cap
        self.starts[l], self.capacity[l] = self.end, room
        self.end += room

    def _grow(self, rows: int) -> None:
        rows = max(rows, 2 * len(self.ids), 1024)
        codes, ids = np.empty((rows, self.code_size), np.uint8), np.empty(rows, np.int64)
        codes[:self.end], ids[:self.end] = self.codes[:self.end], self.ids[:self.end]
        self.codes, self.ids = codes, ids

    def remove(self, ids, lists: np.ndarray | None = None) -> int:
        """Remove ids (absent ones are ignored); returns how many were removed.  lists: where
        they probably are (the lists of their new codes): looked in first, then everywhere."""
        ids = np.unique(np.asarray(ids, np.int64))
        ids = ids[ids <= self.max_id]
        if not len(ids) or not self.ntotal:
            return 0
        removed = 0
        if lists is not None:
            candidates = np.unique(np.asarray(lists, np.int64))
            removed, found = self._remove_in(candidates, ids)
            ids = ids[~found]
            if not len(ids):
                return removed
        return removed + self._remove_in(np.flatnonzero(self.sizes), ids)[0]

    def _remove_in(self, lists: np.ndarray, ids: np.ndarray) -> tuple[int, np.ndarray]:
        """Remove `ids` (sorted) from these lists; returns how many and a mask of `ids` found."""
        rows = self.rows_of_lists(lists)
        hit = is_in_sorted(self.ids[rows], ids)
        found = is_in_sorted(ids, np.unique(self.ids[rows[hit]]))
        if not hit.any():
            return 0, found
        rows_lists = np.repeat(lists, self.sizes[lists])
        for l in np.unique(rows_lists[hit]):  # keep the others, in order, at the list's start
            s, n = int(self.starts[l]), int(self.sizes[l])
            keep = np.flatnonzero(~is_in_sorted(self.ids[s:s + n], ids))
            self.codes[s:s + len(keep)] = self.codes[s + keep]
            self.ids[s:s + len(keep)] = self.ids[s + keep]
            self.ids[s + len(keep):s + n] = -1
            self.sizes[l] = len(keep)
        self.version += 1
        return int(hit.sum()), found

    def compact(self, force: bool = False, room: bool = True) -> None:
        """Pack the lists in list order when holes exceed SLACK of the arena in use (or always),
        each with room for 1/ROOM more rows (or none): a new arena; the old one is freed."""
        if not force and self.holes <= SLACK * max(self.end, 1):
            return
        capacity = self.sizes + (self.sizes // ROOM if room else 0)
        starts, end = starts_of(capacity), int(capacity.sum())
        codes, ids = np.empty((end, self.code_size), np.uint8), np.full(end, -1, np.int64)
        self._copy_lists(codes, ids, starts)
        self.codes, self.ids, self.starts, self.capacity, self.end, self.holes = codes, ids, starts, capacity, end, 0
        self.version += 1

    def _copy_lists(self, codes: np.ndarray, ids: np.ndarray, starts: np.ndarray) -> None:
        """Copy every list's rows into codes and ids (a new arena), list l from row starts[l], a
        run of lists at a time: a 10M-point store copied in one step made 240 MB of row numbers."""
        runs = np.cumsum(self.sizes) // RUN_ROWS  # a list's run: non-decreasing
        for lists in np.split(np.arange(self.nlist), np.flatnonzero(np.diff(runs)) + 1):
            old, new = self.rows_of_lists(lists), self.rows_of_lists(lists, starts)
            codes[new], ids[new] = self.codes[old], self.ids[old]

    # ---- reading -----------------------------------------------------------------------------
    def rows_of_lists(self, lists: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
        """Row numbers of these lists' stored rows, list after list (starts: of another arena)."""
        lists = np.asarray(lists, np.int64)
        starts, sizes = (self.starts if starts is None else starts)[lists], self.sizes[lists]
        return np.repeat(starts - starts_of(sizes), sizes) + np.arange(int(sizes.sum()))

    def stored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every stored row, list after list: rows, their list numbers, their ids."""
        rows = self.rows_of_lists(np.arange(self.nlist))
        return rows, np.repeat(np.arange(self.nlist), self.sizes), self.ids[rows]

    def list_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The list number of stored rows."""
        if self._by_start is None or self._by_start[0] != self.version:
            nonempty = np.flatnonzero(self.sizes)  # their rows are disjoint: distinct starts
            order = nonempty[np.argsort(self.starts[nonempty])]
            self._by_start = (self.version, order, self.starts[order])
        _, order, starts = self._by_start
        return order[np.searchsorted(starts, rows, side="right") - 1]

    def find(self, ids) -> np.ndarray:
        """The row of each id (n,), -1 where absent: one pass over the stored ids."""
        ids = np.asarray(ids, np.int64)
        rows, _, stored_ids = self.stored()
        hit = is_in_sorted(stored_ids, np.unique(ids))
        found_rows, found_ids = rows[hit], stored_ids[hit]
        order = np.argsort(found_ids)
        found_rows, found_ids = found_rows[order], found_ids[order]
        if not len(found_ids):
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(found_ids, ids), len(found_ids) - 1)
        return np.where(found_ids[pos] == ids, found_rows[pos], -1)

    # ---- persistence -------------------------------------------------------------------------
    def frozen(self) -> "ListStore":
        """A copy with the lists back to back (what a snapshot writes, made under the lock)."""
        n = self.ntotal
        codes, ids = np.empty((n, self.code_size), np.uint8), np.empty(n, np.int64)
        self._copy_lists(codes, ids, starts_of(self.sizes))
        return ListStore(self.nlist, self.code_size, self.sizes, codes, ids)

    def save(self, f) -> None:
        """The lists back to back in list order, as an .npz (no pickles): sizes, codes, ids.
        f: a path or file."""
        packed = self.end == self.ntotal and (self.starts == np.cumsum(self.sizes) - self.sizes).all()
        store = self if packed else self.frozen()
        np.savez(f, sizes=store.sizes, codes=store.codes[:store.end], ids=store.ids[:store.end])

    @classmethod
    def load(cls, f, nlist: int, code_size: int) -> "ListStore":
        """What `save` wrote (f: a path or file), checked against the index's shape."""
        try:
            with np.load(f, allow_pickle=False) as data:
                sizes, codes, ids = data["sizes"], data["codes"], data["ids"]
        except (zipfile.BadZipFile, EOFError, KeyError) as e:  # a damaged file
            raise ValueError(f"not a lists file ({type(e).__name__}: {e})") from None
        if sizes.shape != (nlist,) or codes.ndim != 2 or codes.shape[1] != code_size:
            raise ValueError(f"lists of shape {sizes.shape}, codes {codes.shape}: expected {nlist} lists of "
                             f"{code_size}-byte codes")
        return cls(nlist, code_size, sizes, codes, ids)

    @classmethod
    def from_faiss(cls, invlists) -> "ListStore":
        """The codes and ids of faiss inverted lists (an index written before this store)."""
        import faiss
        nlist, code_size = invlists.nlist, invlists.code_size
        sizes = np.array([invlists.list_size(l) for l in range(nlist)], dtype=np.int64)
        codes, ids = np.empty((sizes.sum(), code_size), np.uint8), np.empty(sizes.sum(), np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for l in np.flatnonzero(sizes):
            n = int(sizes[l])
            codes[offsets[l]:offsets[l + 1]] = faiss.rev_swig_ptr(invlists.get_codes(int(l)), n * code_size
                                                                  ).reshape(n, code_size)
            ids[offsets[l]:offsets[l + 1]] = faiss.rev_swig_ptr(invlists.get_ids(int(l)), n)
        return cls(nlist, code_size, sizes, codes, ids)


def is_in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """A mask over `values`: which are in `sorted_set` (sorted, unique)."""
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values
