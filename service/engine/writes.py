"""Writes of points' vectors: upsert (whole points), update_vectors and delete_vectors (some of
their named vectors).  Each space's vectors are checked and encoded without a lock, then one
durable transaction under the write lock, then the in-memory change (Collection.apply)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.network import ENCODERS
from model.threads import use_threads

from ..errors import BadRequest, NotFound
from .ids import UnknownId, canonical_ids

if TYPE_CHECKING:  # annotations only: the collection imports this module
    from .collection import Collection
    from .space import VectorSpace


def is_named(vectors) -> bool:
    """Whether a write's vectors are by name (a dict per point) rather than plain vectors."""
    return not isinstance(vectors, np.ndarray) and len(vectors) > 0 and isinstance(vectors[0], dict)


@dataclass
class Encoded:
    """The vectors of one space in a write batch: which rows of the batch have one, and their codes."""
    rows: list[int]
    x: np.ndarray  # (len(rows), d), as prepared
    codes: np.ndarray
    fast: bool  # acknowledged with `fast` codes (to refine)
    model: object  # the model that encoded them (a swap meanwhile: encode again)


def write(c: Collection, ids: list, vectors, payloads: list[dict | None] | None) -> tuple[int, float]:
    """Collection.upsert (payloads given: whole points) or update_vectors (None: the given vectors
    of stored points).  Returns (seq, encode seconds)."""
    use_threads(c.config.threads)
    ids = c._checked_ids(ids)
    for what, values in (("vectors", vectors), ("payloads", payloads)):
        if values is not None and len(values) != len(ids):
            raise BadRequest(f"{len(ids)} ids but {len(values)} {what}")
    t0 = time.perf_counter()
    encoded = encode(c, vectors)
    encode_seconds = time.perf_counter() - t0
    try:
        payload_json = None if payloads is None else \
            [None if p is None else json.dumps(p, allow_nan=False) for p in payloads]
    except (ValueError, TypeError, OverflowError) as e:
        raise BadRequest(f"cannot store this batch: {e}") from None
    with c.locks.write:
        c.check_writable()
        for space, e in encoded.items():
            if space.index.model is not e.model:  # a new model was swapped in meanwhile: its codes
                e.codes, e.model = space.index.encode(e.x, ENCODERS["fast"] if e.fast else space.encoder), \
                    space.index.model
            e.fast = e.fast and not space.index.exact  # the exact index holds the originals
        uuids_before = c.point_ids.count
        try:
            with c.record.write() as w:
                internal, existing = stored_ids(c, ids, payloads is None)
                old = c.payload_indexes.old_payloads(c.record, sorted(existing)) if payloads is not None else None
                if payload_json is not None:
                    c.record.put_points(internal, payload_json, w.seq)
                changes = put_vectors(c, internal, existing, encoded, w.seq, replace=payloads is not None)
        except BaseException:
            c.point_ids.restore(uuids_before)  # rolled back: so are its new UUIDs
            raise
        id_array = np.array(internal, dtype=np.int64)

        for space, (_, _, _, queued, _) in changes.items():
            space.refiner.pending += queued

        def change():
            c.points.add(id_array)
            for space, (added, codes, removed, _, stored) in changes.items():
                if len(removed):
                    space.index.remove(removed)
                if len(added):
                    space.index.add(codes, added, stored)
            if payloads is not None:
                c.payload_indexes.upsert(internal, payloads, old)
        c.apply(change)
        for space, e in encoded.items():
            space.trainer.maybe_train()
            if e.fast:
                space.refiner.wake.set()
        c.snapshots.count(len(ids))
    return w.seq, encode_seconds

def encode(c: Collection, vectors) -> dict[VectorSpace, Encoded]:
    """Each space's vectors of a batch, checked and encoded (no lock held)."""
    if is_named(vectors):
        groups: dict[str, list[int]] = {}
        for r, named in enumerate(vectors):
            for name in named:
                groups.setdefault(name, []).append(r)
        columns = {name: [vectors[r][name] for r in rows] for name, rows in groups.items()}
    else:  # plain vectors, as one array: the unnamed vector's
        groups, columns = {"": list(range(len(vectors)))}, {"": vectors}
    out = {}
    for name, members in groups.items():
        space = c.space_named(name)
        x = space.prepare(columns[name])
        if space.record.file is not None:
            try:
                space.record.file.check_storable(x)
            except ValueError as e:
                raise BadRequest(str(e)) from None
        index = space.index
        fast = space.refiner.acknowledges_fast()
        out[space] = Encoded(members, x, index.encode(x, ENCODERS["fast"] if fast else space.encoder), fast,
                             index.model)
    return out

def stored_ids(c: Collection, ids: list, existing_only: bool) -> tuple[list[int], set[int]]:
    """Internal ids of a write's points (new UUIDs numbered), and which of them are stored
    (write transaction).  existing_only: every point must be stored (NotFound)."""
    if not existing_only:
        internal, _ = c.point_ids.assign(c.record.db, ids)
        return internal, c.record.existing(internal)
    try:
        internal = c.point_ids.internal(c.record.db, ids, strict=True)
    except UnknownId as e:
        raise NotFound(f"no point with id {e.args[0]} in collection {c.name!r}") from None
    existing = c.record.existing(internal)
    missing = next((i for i in internal if i not in existing), None)
    if missing is not None:
        raise NotFound(f"no point with id {c.point_ids.external(missing)} in collection {c.name!r}")
    return internal, existing

def put_vectors(c: Collection, ids: list[int], existing: set[int], encoded: dict[VectorSpace, Encoded], seq: int,
                 replace: bool) -> dict[VectorSpace, tuple]:
    """Each space's rows for a write (in its transaction): the vectors given; with `replace`,
    the stored points' vectors not given are deleted.  Returns, per space, what the index
    then adds (ids, codes) and removes (ids), the change in its refine queue's length, and which
    of the ids added were stored points (the others are new to every space)."""
    changes = {}
    for space in c.spaces.values():
        e = encoded.get(space)
        given = [ids[r] for r in e.rows] if e else []
        gone = sorted(existing - set(given)) if replace else []
        if not given and not gone:
            continue
        requeued = space.record.delete_vectors(gone, seq) if gone else 0
        added = e.codes if e else None
        if given:
            space.record.put_codes(given, space.index.stored_form(e.codes), seq)
            if space.keeps_originals:
                rows = space.record.put_originals(given, e.x)
                if space.index.exact:  # it reads the vectors where the file holds them
                    added = rows
            requeued += space.record.unqueue(given)  # rewritten: a queue row of its old vector goes
            if e.fast:
                space.record.queue(given, e.x, seq)
        changes[space] = (np.array(given, dtype=np.int64), added,
                          np.array(gone, dtype=np.int64), (len(given) if e and e.fast else 0) - requeued,
                          np.array([i in existing for i in given], dtype=bool))
    return changes

def delete_vectors(c: Collection, ids: list | None, f, names: list[str], chunk: int = 10_000) -> tuple[int, int]:
    """Remove the named vectors of the points given by ids (one of them not stored: NotFound,
    nothing changed) or by a filter, in durable writes of `chunk` points; the points and their
    other vectors stay.  Returns (seq, how many points)."""
    use_threads(c.config.threads)
    spaces = c.spaces_named(names)
    with c.locks.write:
        c.check_writable()
        if f is not None:
            ids = c._selected(f)
        else:
            try:
                ids, _ = stored_ids(c, list(dict.fromkeys(canonical_ids(ids))), existing_only=True)
            except ValueError as e:
                raise BadRequest(str(e)) from None
        ids = sorted(set(ids))
        seq = c.record.last_seq()
        for i0 in range(0, len(ids), chunk):
            seq = _delete_vectors_locked(c, spaces, ids[i0:i0 + chunk])
        c.snapshots.count(len(ids))
    return seq, len(ids)


def _delete_vectors_locked(c: Collection, spaces: list[VectorSpace], ids: list[int]) -> int:
    """One durable delete of some vectors (write lock held); returns its seq."""
    with c.record.write() as w:
        unqueued = [space.record.delete_vectors(ids, w.seq) for space in spaces]
    for space, n in zip(spaces, unqueued):
        space.refiner.pending -= n
    id_array = np.array(ids, dtype=np.int64)

    def change():
        for space in spaces:
            space.index.remove(id_array)
    c.apply(change)
    return w.seq
