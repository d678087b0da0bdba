"""Reads of a collection's stored points: one by id, several by id, a page; their vectors (the
originals where the space keeps them, else the index's).  No write lock: payloads come from the
thread's SQLite reader, vectors from the index under its read lock."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from model.threads import use_threads

from ..errors import BadRequest, NotFound
from .ids import canonical_ids

if TYPE_CHECKING:  # annotations only: the collection imports this module
    from .collection import Collection


def get(c: Collection, point_id: int | str, with_vector: bool) -> dict:
    use_threads(c.config.threads)
    point_id = canonical_ids([point_id])[0]
    internal = c.internal_ids([point_id], strict=True)[0]
    payload = c.record.payloads([internal])
    if internal not in payload:
        raise NotFound(f"point {point_id} not found in collection {c.name!r}")
    out = {"id": point_id, "payload": payload[internal]}
    if with_vector:
        out["vector"] = vectors_of(c, [point_id])[0].tolist()
    return out


def stored_vectors(c: Collection, ids) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of stored points (internal ids) (n, d) and a mask of those found: the originals
    where the space keeps them, otherwise the index's (decoded together).

    The source follows the index in service, read under its lock: before a model, the exact
    index holds the originals; with one, originals kept are removed only with their point
    (a swap with keep_originals false deletes them before the new index serves)."""
    ids = [int(i) for i in ids]
    space = c.space
    with c.locks.index.read():
        index = space.index
        if index.exact or not (space.settings or {}).get("keep_originals"):
            return index.reconstruct(ids)
    originals = c.record.originals(ids)
    present = np.array([i in originals for i in ids], dtype=bool)
    vectors = np.zeros((len(ids), index.d), dtype=np.float32)
    if present.any():
        vectors[present] = np.stack([originals[i] for i in ids if i in originals])
    return vectors, present


def vectors_of(c: Collection, ids) -> np.ndarray:
    """stored_vectors of points (client ids) that must exist (NotFound names the first missing one)."""
    use_threads(c.config.threads)
    vectors, present = stored_vectors(c, c.internal_ids(ids, strict=True))
    if not present.all():
        raise NotFound(f"point {list(ids)[int(np.argmin(present))]} not found in collection {c.name!r}")
    return vectors


def records(c: Collection, ids: list[int], with_payload: bool, with_vector: bool) -> list[dict]:
    """Stored points among `ids` (internal ids; absent ones skipped, repeats dropped), in order."""
    use_threads(c.config.threads)
    ids = list(dict.fromkeys(int(i) for i in ids))
    vectors, present = stored_vectors(c, ids) if with_vector else (None, None)
    payloads = c.record.payloads(ids)
    out = []
    for k, i in enumerate(ids):
        if i not in payloads or (with_vector and not present[k]):
            continue
        record = {"id": c.point_ids.external(i), "payload": payloads[i] if with_payload else None}
        if with_vector:
            record["vector"] = vectors[k].tolist()
        out.append(record)
    return out


def scroll(c: Collection, f, offset: int | str | None, limit: int, with_payload: bool,
           with_vector: bool) -> tuple[list, int | str | None]:
    """A page of points from `offset`, and the first id of the next page.  The order is the
    internal one: integer ids ascending, then UUIDs in the order the collection first saw them."""
    use_threads(c.config.threads)
    if offset is not None:
        try:
            offset = c.internal_ids([offset], strict=True)[0]
        except NotFound:
            raise BadRequest(f"offset {offset} is not a point id of collection {c.name!r}") from None
    resolve = c.has_id_resolver(f)
    with c.locks.index.read():
        ids = c.filter_ids(f, resolve) if f is not None else c.space.index.ids()
    start = np.searchsorted(ids, offset) if offset is not None else 0
    page = ids[start:start + limit + 1].tolist()
    nxt = c.point_ids.external(page[limit]) if len(page) > limit else None
    return records(c, page[:limit], with_payload, with_vector), nxt
