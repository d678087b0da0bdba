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

import itertools
from typing import Callable, Iterable

import numpy as np

from .concurrency import LEAF, OrderedLock
from .field_index import FieldIndex, bitmap_ids, canonical_key
from .record import parsed

MAX_ON_DEMAND = 16  # field indexes built for filters on fields without a declared payload index


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
            holding = bitmap_ids(self.field(c.is_empty.key).nonempty_ids)
            return np.setdiff1d(self.all_ids, holding, assume_unique=True)
        if c.KIND == "is_null":
            return np.intersect1d(self.all_ids, bitmap_ids(self.field(c.is_null.key).null_ids), assume_unique=True)
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
            return index.ids_except({literal(v) for v in m.except_})
        if kind == "text":
            return index.ids_with_text(m.text)
        if c.range is not None:
            return index.ids_in_range(c.range)
        if c.values_count is not None:  # a missing field has 0 values
            test = in_range(c.values_count)
            counted = index.ids_with_count(lambda n: test(n))
            if not test(0):
                return counted
            holding = bitmap_ids(index.holding)
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
                    rows_left = iter(rows())
                    while chunk := list(itertools.islice(rows_left, 10_000)):
                        index.add_many([i for i, _ in chunk], [p for _, p in chunk])
                    declared = {canonical_key(k) for k in self.declared}
                    on_demand = [k for k in self.fields if k not in declared]
                    if len(on_demand) >= MAX_ON_DEMAND:  # the oldest goes (rebuilt if named again)
                        self.fields.pop(on_demand[0], None)
                    self.fields[key] = index
        return index

    def upsert(self, ids: list[int], payloads: list[dict | None], old: dict | None = None):
        """old: {id: payload} of the stored points among ids, as `old_payloads` read them."""
        for index in self.fields.values():
            index.add_many(ids, payloads, old)

    def delete(self, ids: Iterable[int], old: dict | None = None):
        ids = list(ids)
        for index in self.fields.values():
            index.remove_many(ids, old)

    def old_payloads(self, record, ids) -> dict | None:
        """{id: payload} of the stored points among ids, read in a write's transaction before it
        changes them, so that an index update touches only their values (None: no index)."""
        if not self.fields or not ids:
            return None
        return dict(parsed(record.payloads_to_change(ids).items()))

    def arrays(self) -> dict[str, dict]:
        """{declared key: FieldIndex.arrays()} of the declared indexes built (for a snapshot; write
        lock held)."""
        fields, out = dict(self.fields), {}
        for key in dict(self.declared):
            if canonical_key(key) in fields and canonical_key(key) not in {canonical_key(k) for k in out}:
                out[key] = fields[canonical_key(key)].arrays()  # `a[].b` and `a.b` share one index
        return out

    def drop(self, key: str):
        self.declared.pop(key, None)
        self.fields.pop(canonical_key(key), None)

    def schema(self) -> dict:
        """Qdrant's payload_schema of the declared indexes (safe beside concurrent changes)."""
        fields, out = dict(self.fields), {}
        for key, schema in dict(self.declared).items():
            index = fields.get(canonical_key(key))
            out[key] = {"data_type": schema, "points": len(index) if index is not None else 0}
        return out
