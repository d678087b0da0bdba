"""Reads of a collection's stored points: one by id, several by id, a page; their vectors in each
space (the originals where the space keeps them, else the index's).  No write lock: payloads
come from the thread's SQLite reader, vectors from the index under its read lock."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from model.threads import use_threads

from ..errors import BadRequest, NotFound
from .ids import canonical_ids, page_of

if TYPE_CHECKING:  # annotations only: the collection imports this module
    from .collection import Collection
    from .space import VectorSpace


MAX_VECTOR_VALUES = 20_000_000  # numbers of the vectors returned by one request (with_vector)


def returned_dimensions(c: Collection, with_vector) -> int:
    """Numbers per point of the vectors that `with_vector` returns (an unknown name: BadRequest)."""
    return sum(space.dimension for space in c.spaces_named(with_vector)) if with_vector else 0


def get(c: Collection, point_id: int | str, with_vector) -> dict:
    use_threads(c.config.threads)
    point_id = canonical_ids([point_id])[0]
    internal = c.internal_ids([point_id], strict=True)[0]
    found = records(c, [internal], True, with_vector)
    if not found:
        raise NotFound(f"point {point_id} not found in collection {c.name!r}")
    return found[0]


def stored_vectors(space: VectorSpace, locks, ids) -> tuple[np.ndarray, np.ndarray]:
    """A space's vectors of points (internal ids) (n, d) and a mask of those that have one: the
    originals where the space keeps them, otherwise the index's (decoded together).

    The source follows the index in service, read under its lock: before a model, the exact
    index holds the originals; with one, originals kept are removed only with their vector
    (a swap with keep_originals false deletes them before the new index serves)."""
    ids = [int(i) for i in ids]
    with locks.index.read():
        index = space.index
        if index.exact or not (space.settings or {}).get("keep_originals"):
            return index.reconstruct(ids)
    originals = space.record.originals(ids)
    present = np.array([i in originals for i in ids], dtype=bool)
    vectors = np.zeros((len(ids), index.d), dtype=np.float32)
    if present.any():
        vectors[present] = np.stack([originals[i] for i in ids if i in originals])
    return vectors, present


def vectors_of(c: Collection, ids, space: VectorSpace) -> np.ndarray:
    """A space's vectors of points (client ids) that must have one (NotFound names the first
    missing one)."""
    use_threads(c.config.threads)
    vectors, present = stored_vectors(space, c.locks, c.internal_ids(ids, strict=True))
    if not present.all():
        raise NotFound(f"point {list(ids)[int(np.argmin(present))]} of collection {c.name!r} not found, "
                       f"or it has no {space.label}")
    return vectors


def vectors_json(c: Collection, ids, with_vector) -> dict[int, list | dict]:
    """The vectors of points (internal ids) as Qdrant answers them: by name, the ones each point
    has among those asked (with_vector: True, or a list of names); a plain list where that is
    the unnamed vector alone."""
    named: dict[int, dict] = {int(i): {} for i in ids}
    for space in c.spaces_named(with_vector):
        vectors, present = stored_vectors(space, c.locks, list(named))
        for i, v, ok in zip(named, vectors, present):
            if ok:
                named[i][space.name] = v.tolist()
    return {i: v[""] if list(v) == [""] else v for i, v in named.items()}


def records(c: Collection, ids: list[int], with_payload: bool, with_vector) -> list[dict]:
    """Stored points among `ids` (internal ids; absent ones skipped, repeats dropped), in order.
    with_vector: False, True (every vector) or a list of names."""
    use_threads(c.config.threads)
    ids = list(dict.fromkeys(int(i) for i in ids))
    if len(ids) * returned_dimensions(c, with_vector) > MAX_VECTOR_VALUES:
        raise BadRequest(f"this request would return more than {MAX_VECTOR_VALUES} vector values: ask for fewer "
                         f"points or vectors")
    vectors = vectors_json(c, ids, with_vector) if with_vector else {}
    payloads = c.record.payloads(ids)
    out = []
    for i in ids:
        if i not in payloads:
            continue
        record = {"id": c.point_ids.external(i), "payload": payloads[i] if with_payload else None}
        if with_vector:
            record["vector"] = vectors[i]
        out.append(record)
    return out


def scroll(c: Collection, f, offset: int | str | None, limit: int, with_payload: bool,
           with_vector) -> tuple[list, int | str | None]:
    """A page of points from `offset`, and the first id of the next page.  The order is the
    internal one: integer ids ascending, then UUIDs in the order the collection first saw them."""
    use_threads(c.config.threads)
    if offset is not None:
        try:
            offset = c.internal_ids([offset], strict=True)[0]
        except NotFound:
            raise BadRequest(f"offset {offset} is not a point id of collection {c.name!r}") from None
    # a page's vectors stay within a request's (the rest: the next page)
    limit = min(limit, max(1, MAX_VECTOR_VALUES // max(returned_dimensions(c, with_vector), 1)))
    resolve = c.has_id_resolver(f)
    with c.locks.index.read():
        page = c.points.page(offset, limit + 1) if f is None else page_of(c.filter_ids(f, resolve), offset, limit + 1)
    nxt = c.point_ids.external(page[limit]) if len(page) > limit else None
    return records(c, page[:limit], with_payload, with_vector), nxt
