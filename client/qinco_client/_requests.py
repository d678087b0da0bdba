"""What each call sends and how its answer is read: one place for both clients."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from .models import CollectionInfo, Record, ScoredPoint, UpdateResult


@dataclass
class Call:
    method: str
    path: str
    json: Any = None
    params: dict | None = None
    idempotent: bool = True  # may be re-sent after a timeout or a 5xx
    enveloped: bool = True  # the answer is {"result": ...}
    parse: Callable[[Any], Any] = lambda r: r


def as_list(vector) -> list[float]:
    """A vector from a list, tuple or numpy array."""
    return vector.tolist() if hasattr(vector, "tolist") else [float(v) for v in vector]


def as_rows(vectors) -> list[list[float]]:
    if hasattr(vectors, "tolist"):
        return vectors.tolist()
    return [as_list(v) for v in vectors]


def search_body(vector, limit, params, target_recall, with_payload, with_vector) -> dict:
    body = {"vector": as_list(vector), "limit": limit, "with_payload": with_payload, "with_vector": with_vector}
    if params and target_recall is not None:
        raise ValueError("give params or target_recall, not both")
    if params:
        body["params"] = dict(params)
    elif target_recall is not None:
        body["params"] = {"target_recall": target_recall}
    return body


def hits(result) -> list[ScoredPoint]:
    return [ScoredPoint(**h) for h in result]


def create_collection(name, model=None, index=None, metric="l2", encoder=None) -> Call:
    """encoder None: the server's default."""
    body = {k: v for k, v in (("model", model), ("index", index), ("encoder", encoder)) if v is not None}
    return Call("PUT", f"/collections/{name}", {**body, "metric": metric},
                idempotent=False, parse=lambda r: CollectionInfo(**r))


def get_collection(name) -> Call:
    return Call("GET", f"/collections/{name}", parse=lambda r: CollectionInfo(**r))


def list_collections() -> Call:
    return Call("GET", "/collections", parse=lambda r: [c["name"] for c in r["collections"]])


def delete_collection(name) -> Call:
    return Call("DELETE", f"/collections/{name}", parse=lambda r: bool(r))


def upsert_batch(collection, ids, vectors, payloads) -> Call:
    points = [{"id": int(i), "vector": v, **({"payload": p} if p is not None else {})}
              for i, v, p in zip(ids, vectors, payloads)]
    # Upserts by id are idempotent: re-sending a batch leaves the same state.
    return Call("PUT", f"/collections/{collection}/points", {"points": points}, parse=lambda r: UpdateResult(**r))


def search(collection, vector, limit, params, target_recall, with_payload, with_vector) -> Call:
    body = search_body(vector, limit, params, target_recall, with_payload, with_vector)
    return Call("POST", f"/collections/{collection}/points/search", body, parse=hits)


def search_batch(collection, vectors, limit, params, target_recall, with_payload, with_vector) -> Call:
    bodies = [search_body(v, limit, params, target_recall, with_payload, with_vector) for v in vectors]
    return Call("POST", f"/collections/{collection}/points/search/batch", {"searches": bodies},
                parse=lambda r: [hits(h) for h in r])


def recommend(collection, positive, limit, with_payload) -> Call:
    body = {"positive": [int(i) for i in positive], "limit": limit, "with_payload": with_payload}
    return Call("POST", f"/collections/{collection}/points/recommend", body, parse=hits)


def get(collection, point_id, with_vector) -> Call:
    return Call("GET", f"/collections/{collection}/points/{int(point_id)}",
                params={"with_vector": "true"} if with_vector else None, parse=lambda r: Record(**r))


def delete(collection, ids) -> Call:
    return Call("POST", f"/collections/{collection}/points/delete", {"points": [int(i) for i in ids]},
                parse=lambda r: UpdateResult(**r))


def count(collection) -> Call:
    return Call("GET", f"/collections/{collection}/points/count", parse=lambda r: r["count"])


def health() -> Call:
    return Call("GET", "/readyz", enveloped=False)


def upsert_batches(collection, ids, vectors, payloads, batch_size):
    """One upsert call per batch of points."""
    ids = [int(i) for i in ids]
    rows = as_rows(vectors)
    if len(rows) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(rows)} vectors")
    payloads = list(payloads) if payloads is not None else [None] * len(ids)
    if len(payloads) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(payloads)} payloads")
    for i0 in range(0, len(ids), batch_size):
        sl = slice(i0, i0 + batch_size)
        yield upsert_batch(collection, ids[sl], rows[sl], payloads[sl])


@contextmanager
def progress(total: int, enabled: bool):
    """Yields advance(n): a tqdm bar when installed and enabled, else nothing shown.

    The client depends only on httpx and pydantic.
    """
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, unit="pt", desc="upsert")
        except ImportError:
            pass
    try:
        yield (bar.update if bar is not None else lambda n: None)
    finally:
        if bar is not None:
            bar.close()
