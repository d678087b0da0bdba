"""Qdrant's payload filters, evaluated over in-memory field indexes.

A filter (`must` / `should` / `must_not`, nested) turns into a sorted array of the ids it
lets through, by set algebra over the ids that each condition matches.  Conditions on a
field are answered by a `FieldIndex`: for each distinct value, the ids holding it.
A field named by `PUT /collections/{name}/index` has its index built when the collection
opens; any other field gets one built on the first filter that names it (one pass over
the payloads), kept up to date by every write after that.  So no filter reads payload
JSON per query, declared index or not.

Semantics, as Qdrant documents them: a key addresses nested fields with dots
(`a.b`; arrays met on the way are flattened, `a[].b` says so explicitly); a field
condition holds if any of the field's values satisfies it (an array matches if any
element does), and never holds for a missing field (but `values_count`, which counts 0).
`match.except` holds for a value that is not in the list (and for a value of another
type, not for null).  `is_empty`: missing, null or [] ([null] is not empty); `is_null`: a
value stored at the key is null.  `values_count`: how many values, nulls not counted.
At most MAX_ON_DEMAND fields without a declared index keep an index at a time.

Filters arrive as the request models of service/http/schemas/filters.py; this module reads them
by their fields and their KIND tag (no import of the HTTP layer).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from .concurrency import LEAF, OrderedLock

MAX_ON_DEMAND = 16  # field indexes built for filters on fields without a declared payload index


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


class FieldIndex:
    """The ids holding each distinct value of one payload field."""

    def __init__(self, key: str):
        self.key = key
        self.by_value: dict[tuple, set[int]] = {}
        self.values_of: dict[int, tuple] = {}  # id -> its tagged values (for updates and values_count)
        self.null_ids: set[int] = set()  # a value stored at the key is null
        self.nonempty_ids: set[int] = set()  # a value stored at the key is neither null nor []
        self._numeric = None  # (sorted numeric values, their ids), made on the first range after a write

    def add(self, point_id: int, payload: dict | None):
        self.remove(point_id)
        values = tuple(tagged(v) for v in field_values(payload, self.key))
        if values:
            self.values_of[point_id] = values
            for t in set(values):
                self.by_value.setdefault(t, set()).add(point_id)
        raw = raw_values(payload, self.key)
        if any(v is None for v in raw):
            self.null_ids.add(point_id)
        if any(v is not None and v != [] for v in raw):
            self.nonempty_ids.add(point_id)
        self._numeric = None

    def remove(self, point_id: int):
        for t in set(self.values_of.pop(point_id, ())):
            ids = self.by_value.get(t)
            if ids is not None:
                ids.discard(point_id)
                if not ids:
                    del self.by_value[t]
        self.null_ids.discard(point_id)
        self.nonempty_ids.discard(point_id)
        self._numeric = None

    def ids_where(self, test: Callable[[tuple], bool]) -> np.ndarray:
        """Ids holding at least one value for which test(tagged value) is true."""
        out: set[int] = set()
        for t, ids in self.by_value.items():
            if test(t):
                out |= ids
        return as_ids(out)

    def ids_of(self, values: Iterable[tuple]) -> np.ndarray:
        out: set[int] = set()
        for t in values:
            out |= self.by_value.get(t, set())
        return as_ids(out)

    def ids_in_range(self, r) -> np.ndarray:
        """Ids holding a number within the range: binary search over the sorted numbers."""
        numeric = self._numeric
        if numeric is None:
            pairs = [(t[1], i) for t, ids in self.by_value.items() if t[0] in ("int", "float") for i in ids]
            values = np.array([v for v, _ in pairs], dtype=np.float64)
            ids = np.array([i for _, i in pairs], dtype=np.int64)
            order = np.argsort(values, kind="stable")
            numeric = self._numeric = (values[order], ids[order])
        values, ids = numeric
        lo = 0 if r.gt is None and r.gte is None else max(
            np.searchsorted(values, r.gt, "right") if r.gt is not None else 0,
            np.searchsorted(values, r.gte, "left") if r.gte is not None else 0)
        hi = len(values) if r.lt is None and r.lte is None else min(
            np.searchsorted(values, r.lt, "left") if r.lt is not None else len(values),
            np.searchsorted(values, r.lte, "right") if r.lte is not None else len(values))
        return np.unique(ids[lo:max(lo, hi)])

    def ids_with_count(self, test: Callable[[int], bool]) -> np.ndarray:
        """Ids holding values whose number (nulls not counted) passes the test."""
        return as_ids(i for i, values in self.values_of.items() if test(sum(t[0] != "null" for t in values)))


def as_ids(ids: Iterable[int]) -> np.ndarray:
    return np.unique(np.fromiter(ids, dtype=np.int64))


def literal(v) -> tuple:
    return ("bool", v) if isinstance(v, bool) else ("int", v) if isinstance(v, int) else ("str", v)


def in_range(r) -> Callable[[float], bool]:
    def test(x: float) -> bool:
        return ((r.gt is None or x > r.gt) and (r.gte is None or x >= r.gte)
                and (r.lt is None or x < r.lt) and (r.lte is None or x <= r.lte))
    return test


def has_id_values(f) -> list:
    """Every id named by a has_id condition of the filter, nested ones included."""
    out = []
    for c in f.parts():
        if c.KIND == "filter":
            out += has_id_values(c)
        elif c.KIND == "has_id":
            out += c.has_id
    return out


class Evaluator:
    """Evaluates filters for one collection: `all_ids` (sorted), a field-index getter, and how
    `has_id`'s client ids (integers or UUIDs) become internal ids (unknown ones left out)."""

    def __init__(self, all_ids: np.ndarray, field: Callable[[str], FieldIndex],
                 resolve: Callable[[list], list[int]] = lambda ids: ids):
        self.all_ids, self.field, self.resolve = all_ids, field, resolve

    def ids(self, f) -> np.ndarray:
        """The sorted ids that the filter lets through."""
        out = self.all_ids
        for c in as_list(f.must):
            out = np.intersect1d(out, self.condition(c), assume_unique=True)
        should = as_list(f.should)
        if should:
            any_of = np.unique(np.concatenate([self.condition(c) for c in should]))
            out = np.intersect1d(out, any_of, assume_unique=True)
        for c in as_list(f.must_not):
            out = np.setdiff1d(out, self.condition(c), assume_unique=True)
        m = f.min_should
        if m is not None and m.min_count > len(m.conditions):
            out = out[:0]
        elif m is not None and m.min_count:
            ids, counts = np.unique(np.concatenate([self.condition(c) for c in m.conditions]), return_counts=True)
            out = np.intersect1d(out, ids[counts >= m.min_count], assume_unique=True)
        return out

    def condition(self, c) -> np.ndarray:
        if c.KIND == "filter":
            return self.ids(c)
        if c.KIND == "has_id":
            return np.intersect1d(self.all_ids, np.unique(np.array(self.resolve(c.has_id), dtype=np.int64)), assume_unique=True)
        if c.KIND == "is_empty":  # missing, null or []
            holding = as_ids(self.field(c.is_empty.key).nonempty_ids)
            return np.setdiff1d(self.all_ids, holding, assume_unique=True)
        if c.KIND == "is_null":
            return np.intersect1d(self.all_ids, as_ids(self.field(c.is_null.key).null_ids), assume_unique=True)
        return np.intersect1d(self.all_ids, self.field_condition(c), assume_unique=True)

    def field_condition(self, c) -> np.ndarray:
        index = self.field(c.key)
        m = c.match
        kind = m.KIND if m is not None else None
        if kind == "value":
            return index.ids_of([literal(m.value)])
        if kind == "any":
            return index.ids_of([literal(v) for v in m.any])
        if kind == "except":
            excluded = {literal(v) for v in m.except_}
            return index.ids_where(lambda t: t[0] != "null" and t not in excluded)
        if kind == "text":
            return index.ids_where(lambda t: t[0] == "str" and m.text in t[1])
        if c.range is not None:
            return index.ids_in_range(c.range)
        if c.values_count is not None:  # a missing field has 0 values
            test = in_range(c.values_count)
            counted = index.ids_with_count(lambda n: test(n))
            if not test(0):
                return counted
            holding = as_ids(index.values_of)
            return np.union1d(counted, np.setdiff1d(self.all_ids, holding, assume_unique=True))
        raise ValueError("a field condition needs match, range or values_count")


def as_list(x) -> list:
    return [] if x is None else x if isinstance(x, list) else [x]


class PayloadIndexes:
    """A collection's field indexes: the declared ones (durable, with their schema) and
    those built on demand.  Reads and writes are ordered by the collection's index lock;
    `build_lock` makes concurrent readers build a missing index once."""

    def __init__(self, declared: dict[str, str]):
        self.declared = dict(declared)  # key -> field schema
        self.fields: dict[str, FieldIndex] = {}
        self.build_lock = OrderedLock(LEAF, "payload index build")

    def get(self, key: str, rows: Callable[[], Iterable[tuple[int, dict | None]]]) -> FieldIndex:
        key = canonical_key(key)
        index = self.fields.get(key)
        if index is None:
            with self.build_lock:
                index = self.fields.get(key)
                if index is None:
                    index = FieldIndex(key)
                    for point_id, payload in rows():
                        index.add(point_id, payload)
                    on_demand = [k for k in self.fields if k not in self.declared]
                    if len(on_demand) >= MAX_ON_DEMAND:  # the oldest goes (rebuilt if named again)
                        self.fields.pop(on_demand[0], None)
                    self.fields[key] = index
        return index

    def upsert(self, ids: list[int], payloads: list[dict | None]):
        for index in self.fields.values():
            for i, p in zip(ids, payloads):
                index.add(int(i), p)

    def delete(self, ids: Iterable[int]):
        for index in self.fields.values():
            for i in ids:
                index.remove(int(i))

    def drop(self, key: str):
        self.declared.pop(key, None)
        self.fields.pop(canonical_key(key), None)

    def schema(self) -> dict:
        """Qdrant's payload_schema of the declared indexes (safe beside concurrent changes)."""
        fields, out = dict(self.fields), {}
        for key, schema in dict(self.declared).items():
            index = fields.get(canonical_key(key))
            out[key] = {"data_type": schema, "points": len(index.values_of) if index is not None else 0}
        return out
