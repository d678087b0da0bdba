"""A payload field's index: for each distinct value, the ids holding it, with no Python object
per point (filters.py evaluates Qdrant's filters over them).

Values are read from a payload as Qdrant does (filters.py's docstring): dotted keys, arrays
flattened, each value tagged with its JSON type so that true, 1 and 1.0 stay apart.  Strings,
bools, objects and nulls get a roaring bitmap of ids each (pyroaring.BitMap64: a few bits to
two bytes a point); integers and floats go to flat arrays of (value, id), 16 bytes a value.
Writes that replace or delete points pass the payloads they held, so that only those values'
bitmaps change.  `arrays` / `from_arrays` turn an index into flat arrays and back, for snapshots
(np.savez, no pickle).
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any, Callable, Iterable

import numpy as np
from pyroaring import BitMap64

from model.lists import is_in_sorted

INT64 = (-(1 << 63), (1 << 63) - 1)


def field_values(payload: dict | None, key: str) -> list:
    """Every value at a dotted key, arrays flattened; [] when the field is missing."""
    current = [payload] if payload is not None else []
    for part in key.replace("[]", "").split("."):
        nxt = []
        for value in current:
            for v in (value if isinstance(value, list) else [value]):
                if isinstance(v, dict) and part in v:
                    nxt.append(v[part])
        current = nxt
    out = []
    for v in current:
        out.extend(v if isinstance(v, list) else [v])
    return out


def raw_values(payload: dict | None, key: str) -> list:
    """The values stored at a key, arrays flattened on the way but not at the last step."""
    parent, _, last = canonical_key(key).rpartition(".")
    holders = field_values(payload, parent) if parent else ([payload] if payload is not None else [])
    return [v[last] for v in holders if isinstance(v, dict) and last in v]


def canonical_key(key: str) -> str:
    """`a[].b` and `a.b` address the same values (arrays are flattened either way)."""
    return key.replace("[]", "")


def tagged(value) -> tuple[str, Any]:
    """A value with its JSON type, so that true, 1 and 1.0 stay apart."""
    if value is None:
        return ("null", None)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value)
    if isinstance(value, str):
        return ("str", value)
    return ("other", None)  # an object (or a nested array)


class Numbers:
    """The numbers of one field and the ids holding them, in two flat arrays (16 bytes a value),
    sorted by value when a read needs them: writes append, the first read after them sorts."""

    def __init__(self, dtype):
        # (values, ids) sorted by value, and the appended parts (values, ids) not sorted in yet:
        # replaced as one tuple.  Readers (under the index read lock) sort under _merge, once.
        self._state = (np.empty(0, dtype), np.empty(0, np.int64), ())
        self._merge = threading.Lock()

    def add(self, values: list, ids: list):
        if ids:
            v, i, tail = self._state
            tail += ((np.array(values, v.dtype), np.array(ids, np.int64)),)
            # parts of like size are joined (a binary counter: log parts, each value copied log
            # times), so that a long load leaves a few large arrays, not many small ones in the heap
            while len(tail) > 1 and len(tail[-2][1]) <= 2 * len(tail[-1][1]):
                (a, ai), (b, bi) = tail[-2:]
                tail = tail[:-2] + ((np.concatenate([a, b]), np.concatenate([ai, bi])),)
            self._state = (v, i, tail)

    def remove(self, ids: np.ndarray):
        """ids: sorted.  A pass over the arrays (vectorised: milliseconds a million)."""
        values, held = self.sorted()
        keep = ~is_in_sorted(held, ids)
        self._state = (values[keep], held[keep], ())

    def restore(self, values: np.ndarray, ids: np.ndarray):
        """The state that `sorted` returned (read back from a snapshot)."""
        if values.dtype != self._state[0].dtype or ids.dtype != np.int64 or values.ndim != 1 \
                or values.shape != ids.shape or (np.diff(values) < 0).any():
            raise ValueError("the numbers are not sorted (value, id) arrays of this field's type")
        self._state = (values, ids, ())

    def sorted(self) -> tuple[np.ndarray, np.ndarray]:
        values, ids, tail = self._state
        if not tail:
            return values, ids
        with self._merge:
            values, ids, tail = self._state
            if tail:  # the tail sorted, then merged into the sorted values
                tv, ti = np.concatenate([t[0] for t in tail]), np.concatenate([t[1] for t in tail])
                order = np.argsort(tv, kind="stable")
                tv, ti = tv[order], ti[order]
                at = np.searchsorted(values, tv, "right") + np.arange(len(tv))  # their places once merged
                merged_v, merged_i = np.empty(len(values) + len(tv), values.dtype), np.empty(len(values) + len(tv), np.int64)
                rest = np.ones(len(merged_v), bool)
                rest[at] = False
                merged_v[at], merged_i[at], merged_v[rest], merged_i[rest] = tv, ti, values, ids
                values, ids = merged_v, merged_i
                self._state = (values, ids, ())
            return values, ids

    def _key(self, x, up: bool):
        """A bound for searchsorted in the values' own type (an int64 array is not cast to float)."""
        if self._state[0].dtype.kind == "f":
            return x
        k = math.ceil(x) if up else math.floor(x)
        return min(max(k, INT64[0]), INT64[1])

    def equal(self, value) -> np.ndarray:
        values, ids = self.sorted()
        if not INT64[0] <= value <= INT64[1]:
            return ids[:0]
        return ids[np.searchsorted(values, value, "left"):np.searchsorted(values, value, "right")]

    def in_range(self, r) -> np.ndarray:
        """Ids holding a number within the range (binary search over the sorted numbers)."""
        values, ids = self.sorted()
        lo, hi = 0, len(values)
        if r.gt is not None:  # v > x: past floor(x) for integers
            lo = max(lo, np.searchsorted(values, self._key(r.gt, False), "right"))
        if r.gte is not None:
            lo = max(lo, np.searchsorted(values, self._key(r.gte, True), "left"))
        if r.lt is not None:
            hi = min(hi, np.searchsorted(values, self._key(r.lt, True), "left"))
        if r.lte is not None:
            hi = min(hi, np.searchsorted(values, self._key(r.lte, False), "right"))
        return ids[lo:max(lo, hi)]

    def not_in(self, excluded: list) -> np.ndarray:
        values, ids = self.sorted()
        excluded = [v for v in excluded if INT64[0] <= v <= INT64[1]]
        return ids[~np.isin(values, np.array(excluded, values.dtype))] if excluded else ids


class FieldIndex:
    """The ids holding each value of one payload field (see the module's docstring): bitmaps per
    distinct string, bool, object or null value, numbers in `Numbers`, and bitmaps of the ids that
    hold a value (nulls included), a null, a non-empty value, and each count of values."""

    def __init__(self, key: str):
        self.key = key
        self.by_value: dict[tuple, BitMap64] = {}  # ("str", s), ("bool", b), ("other", None), ("null", None)
        self.ints, self.floats = Numbers(np.int64), Numbers(np.float64)
        self.holding = BitMap64()  # ids with at least one value at the key (null included)
        self.null_ids = BitMap64()  # a value stored at the key is null
        self.nonempty_ids = BitMap64()  # a value stored at the key is neither null nor []
        self.by_count: dict[int, BitMap64] = {}  # ids in `holding` by how many non-null values

    def add(self, point_id: int, payload: dict | None):
        self.add_many([point_id], [payload])

    def remove(self, point_id: int):
        self.remove_many([point_id])

    def facts(self, payload: dict | None) -> tuple[list[tuple], bool, bool]:
        """A payload's tagged values at the key, and whether it holds a null, a non-empty value."""
        raw = raw_values(payload, self.key)
        return ([tagged(v) for v in field_values(payload, self.key)], any(v is None for v in raw),
                any(v is not None and v != [] for v in raw))

    def add_many(self, ids: Iterable[int], payloads: Iterable[dict | None], old: dict | None = None):
        """Index these points' payloads, replacing what was indexed for them (the last payload
        of an id given twice wins).  old: the payloads the stored ones among them held (see
        `remove_many`)."""
        latest = dict(zip((int(i) for i in ids), payloads))
        self.remove_many(list(latest), old)
        holding, nulls, nonempty = [], [], []
        by_value: dict[tuple, list] = {}
        by_count: dict[int, list] = {}
        numbers = {"int": ([], []), "float": ([], [])}  # (values, ids)
        for i, payload in latest.items():
            values, null, filled = self.facts(payload)
            if values:
                holding.append(i)
                by_count.setdefault(counted(values), []).append(i)
            for t in set(values):
                if t[0] in numbers:
                    numbers[t[0]][0].append(t[1])
                    numbers[t[0]][1].append(i)
                else:
                    by_value.setdefault(t, []).append(i)
            if null:
                nulls.append(i)
            if filled:
                nonempty.append(i)
        for bitmap, members in ((self.holding, holding), (self.null_ids, nulls), (self.nonempty_ids, nonempty)):
            bitmap.update(members)
        for bitmaps, groups in ((self.by_value, by_value), (self.by_count, by_count)):
            for key, members in groups.items():
                bitmaps.setdefault(key, BitMap64()).update(members)
        self.ints.add(*numbers["int"])
        self.floats.add(*numbers["float"])

    def remove_many(self, ids: Iterable[int], old: dict | None = None):
        """Unindex these points.  old: {id: payload} of the indexed ones (read from the record in
        the write's transaction): only their values' bitmaps change.  Without it (or missing
        one), every bitmap of the field is passed over."""
        gone = BitMap64(ids) & (self.holding | self.null_ids | self.nonempty_ids)
        if not gone:
            return
        if old is not None and all(i in old for i in gone):
            touched_values, touched_counts = set(), set()
            for i in gone:
                values = self.facts(old[i])[0]
                touched_values.update(t for t in values if t[0] not in ("int", "float"))
                if values:
                    touched_counts.add(counted(values))
        else:
            touched_values, touched_counts = list(self.by_value), list(self.by_count)
        for bitmaps, keys in ((self.by_value, touched_values), (self.by_count, touched_counts)):
            for key in keys:
                if key in bitmaps:
                    bitmaps[key] -= gone
                    if not bitmaps[key]:
                        del bitmaps[key]
        for bitmap in (self.holding, self.null_ids, self.nonempty_ids):
            bitmap -= gone
        gone_ids = bitmap_ids(gone)
        self.ints.remove(gone_ids)
        self.floats.remove(gone_ids)

    def ids(self) -> np.ndarray:
        """Every id the index holds anything of (a value, a null, an empty array), sorted."""
        return bitmap_ids(self.holding | self.null_ids | self.nonempty_ids)

    def arrays(self) -> dict[str, np.ndarray]:
        """The index as flat arrays (for np.savez; write lock held, so that no write changes it
        meanwhile): the bitmaps serialized one after another, the numbers as they are."""
        values, counts = list(self.by_value), list(self.by_count)
        bitmaps = [self.holding, self.null_ids, self.nonempty_ids] + [self.by_value[v] for v in values] \
            + [self.by_count[n] for n in counts]
        blobs = [b.serialize() for b in bitmaps]
        header = {"key": self.key, "values": [list(v) for v in values], "counts": counts}
        (ints, int_ids), (floats, float_ids) = self.ints.sorted(), self.floats.sorted()
        return {"header": np.frombuffer(json.dumps(header).encode(), np.uint8),
                "bitmaps": np.frombuffer(b"".join(blobs), np.uint8),
                "bitmap_ends": np.cumsum([len(b) for b in blobs], dtype=np.int64),
                "ints": ints, "int_ids": int_ids, "floats": floats, "float_ids": float_ids}

    @classmethod
    def from_arrays(cls, arrays) -> FieldIndex:
        """The index that `arrays` made (ValueError if they are not one)."""
        try:
            header = json.loads(bytes(arrays["header"]))
            blob, ends = bytes(arrays["bitmaps"]), arrays["bitmap_ends"].tolist()
            if any(b <= a for a, b in zip([0] + ends, ends)) or (ends and ends[-1] != len(blob)):
                raise ValueError("the bitmaps' ends do not rise to the blob's end")
            bitmaps = [BitMap64.deserialize(blob[a:b]) for a, b in zip([0] + ends[:-1], ends)]
            values, counts = [tuple(v) for v in header["values"]], [int(n) for n in header["counts"]]
            if len(bitmaps) != 3 + len(values) + len(counts):
                raise ValueError("bitmap count does not match the header")
            index = cls(header["key"])
            index.holding, index.null_ids, index.nonempty_ids = bitmaps[:3]
            index.by_value = dict(zip(values, bitmaps[3:3 + len(values)]))
            index.by_count = dict(zip(counts, bitmaps[3 + len(values):]))
            index.ints.restore(arrays["ints"], arrays["int_ids"])
            index.floats.restore(arrays["floats"], arrays["float_ids"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a field index: {e}") from None
        return index

    def __len__(self) -> int:
        """The points holding a value at the key."""
        return len(self.holding)

    def ids_of(self, values: Iterable[tuple]) -> np.ndarray:
        """Ids holding one of these tagged values (literal(): bool, int or str)."""
        out, found = BitMap64(), []
        for t in values:
            if t[0] == "int":
                found.append(self.ints.equal(t[1]))
            elif t in self.by_value:
                out |= self.by_value[t]
        return union(bitmap_ids(out), *found)

    def ids_except(self, excluded: set[tuple]) -> np.ndarray:
        """Ids holding a non-null value outside `excluded` (tagged literals)."""
        out = BitMap64()
        for t, ids in self.by_value.items():
            if t[0] != "null" and t not in excluded:
                out |= ids
        ints = self.ints.not_in([v for tag, v in excluded if tag == "int"])
        return union(bitmap_ids(out), ints, self.floats.sorted()[1])

    def ids_with_text(self, text: str) -> np.ndarray:
        """Ids holding a string that contains `text`."""
        out = BitMap64()
        for t, ids in self.by_value.items():
            if t[0] == "str" and text in t[1]:
                out |= ids
        return bitmap_ids(out)

    def ids_in_range(self, r) -> np.ndarray:
        return union(self.ints.in_range(r), self.floats.in_range(r))

    def ids_with_count(self, test: Callable[[int], bool]) -> np.ndarray:
        """Ids holding a value whose number of values (nulls not counted) passes the test."""
        out = BitMap64()
        for n, ids in self.by_count.items():
            if test(n):
                out |= ids
        return bitmap_ids(out)


def counted(values: list[tuple]) -> int:
    """How many values a point holds at the key, as values_count counts them (nulls not)."""
    return sum(t[0] != "null" for t in values)


def bitmap_ids(bitmap: BitMap64) -> np.ndarray:
    """A bitmap's ids, sorted, as int64."""
    return np.frombuffer(bitmap.to_array(), dtype=np.uint64).astype(np.int64)


def union(*arrays: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate(arrays)) if len(arrays) > 1 else np.unique(arrays[0])


