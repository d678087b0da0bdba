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
element does), and never holds for a missing field (but for `values_count`, which counts 0).  `match.except` holds for a value
that is not in the list (and for a value of another type, not for null).  `is_empty`:
missing, null or []; `is_null`: the value is null.  `values_count`: how many values.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

import numpy as np

from . import schemas

MISSING = object()


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


def top_value(payload: dict | None, key: str):
    """The value stored at a key (no flattening at the last step), or MISSING."""
    values = field_values(payload, key.rsplit(".", 1)[0]) if "." in key else [payload]
    last = key.rsplit(".", 1)[-1].replace("[]", "")
    for v in values:
        if isinstance(v, dict) and last in v:
            return v[last]
    return MISSING


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
        self.null_ids: set[int] = set()  # the stored value itself is null

    def add(self, point_id: int, payload: dict | None):
        self.remove(point_id)
        values = tuple(tagged(v) for v in field_values(payload, self.key))
        if values:
            self.values_of[point_id] = values
            for t in set(values):
                self.by_value.setdefault(t, set()).add(point_id)
        if top_value(payload, self.key) is None:
            self.null_ids.add(point_id)

    def remove(self, point_id: int):
        for t in set(self.values_of.pop(point_id, ())):
            ids = self.by_value.get(t)
            if ids is not None:
                ids.discard(point_id)
                if not ids:
                    del self.by_value[t]
        self.null_ids.discard(point_id)

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

    def ids_with_count(self, test: Callable[[int], bool]) -> np.ndarray:
        return as_ids(i for i, values in self.values_of.items() if test(len(values)))


def as_ids(ids: Iterable[int]) -> np.ndarray:
    return np.unique(np.fromiter(ids, dtype=np.int64))


def literal(v) -> tuple:
    return ("bool", v) if isinstance(v, bool) else ("int", v) if isinstance(v, int) else ("str", v)


def in_range(r: schemas.Range) -> Callable[[float], bool]:
    def test(x: float) -> bool:
        return ((r.gt is None or x > r.gt) and (r.gte is None or x >= r.gte)
                and (r.lt is None or x < r.lt) and (r.lte is None or x <= r.lte))
    return test


class Evaluator:
    """Evaluates filters for one collection: `all_ids` (sorted) and a field-index getter."""

    def __init__(self, all_ids: np.ndarray, field: Callable[[str], FieldIndex]):
        self.all_ids, self.field = all_ids, field

    def ids(self, f: schemas.Filter) -> np.ndarray:
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
        return out

    def condition(self, c) -> np.ndarray:
        if isinstance(c, schemas.Filter):
            return self.ids(c)
        if isinstance(c, schemas.HasIdCondition):
            return np.intersect1d(self.all_ids, np.unique(np.array(c.has_id, dtype=np.int64)), assume_unique=True)
        if isinstance(c, schemas.IsEmptyCondition):
            index = self.field(c.is_empty.key)
            holding = index.ids_where(lambda t: t[0] != "null")
            return np.setdiff1d(self.all_ids, holding, assume_unique=True)
        if isinstance(c, schemas.IsNullCondition):
            return np.intersect1d(self.all_ids, as_ids(self.field(c.is_null.key).null_ids), assume_unique=True)
        return np.intersect1d(self.all_ids, self.field_condition(c), assume_unique=True)

    def field_condition(self, c: schemas.FieldCondition) -> np.ndarray:
        index = self.field(c.key)
        m = c.match
        if isinstance(m, schemas.MatchValue):
            return index.ids_of([literal(m.value)])
        if isinstance(m, schemas.MatchAny):
            return index.ids_of([literal(v) for v in m.any])
        if isinstance(m, schemas.MatchExcept):
            excluded = {literal(v) for v in m.except_}
            return index.ids_where(lambda t: t[0] != "null" and t not in excluded)
        if isinstance(m, schemas.MatchText):
            return index.ids_where(lambda t: t[0] == "str" and m.text in t[1])
        if c.range is not None:
            test = in_range(c.range)
            return index.ids_where(lambda t: t[0] in ("int", "float") and test(t[1]))
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


def keys_of(f: schemas.Filter) -> set[str]:
    """Every payload key a filter reads."""
    keys = set()
    for c in as_list(f.must) + as_list(f.should) + as_list(f.must_not):
        if isinstance(c, schemas.Filter):
            keys |= keys_of(c)
        elif isinstance(c, schemas.FieldCondition):
            keys.add(c.key)
        elif isinstance(c, schemas.IsEmptyCondition):
            keys.add(c.is_empty.key)
        elif isinstance(c, schemas.IsNullCondition):
            keys.add(c.is_null.key)
    return keys


class PayloadIndexes:
    """A collection's field indexes: the declared ones (durable, with their schema) and
    those built on demand.  Reads and writes are ordered by the collection's index lock;
    `build_lock` makes concurrent readers build a missing index once."""

    def __init__(self, declared: dict[str, str]):
        self.declared = dict(declared)  # key -> field schema
        self.fields: dict[str, FieldIndex] = {}
        self.build_lock = threading.Lock()

    def get(self, key: str, rows: Callable[[], Iterable[tuple[int, dict | None]]]) -> FieldIndex:
        index = self.fields.get(key)
        if index is None:
            with self.build_lock:
                index = self.fields.get(key)
                if index is None:
                    index = FieldIndex(key)
                    for point_id, payload in rows():
                        index.add(point_id, payload)
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
        self.fields.pop(key, None)
