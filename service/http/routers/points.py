"""Points: upsert, retrieve, scroll, count, delete; payload operations."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Path

from ...engine.collection import Collection
from ...errors import InvalidInput
from .. import schemas
from ..deps import JsonRoute, Service, collection, ready
from ..responses import ok, record_json, update_result, wants_payload

router = APIRouter(route_class=JsonRoute, tags=["points"], responses=schemas.ERROR_RESPONSES)


@router.put("/collections/{name}/points", response_model=schemas.Envelope[schemas.UpdateResult])
def upsert(body: schemas.UpsertPoints, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """`points` or Qdrant's `batch`; answered once the batch is durable."""
    t0 = time.perf_counter()
    ids, vectors, payloads = body.columns()
    svc.check_batch(len(ids), "points")
    seq, encode_seconds = c.upsert(ids, vectors, payloads)
    svc.metrics.encode.observe(encode_seconds)
    return ok(update_result(seq, len(ids)), t0)


@router.put("/collections/{name}/points/vectors", response_model=schemas.Envelope[schemas.UpdateResult])
def update_vectors(body: schemas.UpdateVectors, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Qdrant's update_vectors: set the given (named) vectors of stored points; the rest stays."""
    t0 = time.perf_counter()
    svc.check_batch(len(body.points), "points")
    seq, encode_seconds = c.update_vectors([p.id for p in body.points], [schemas.by_name(p.vector) for p in body.points])
    svc.metrics.encode.observe(encode_seconds)
    return ok(update_result(seq, len(body.points)), t0)


@router.post("/collections/{name}/points/vectors/delete", response_model=schemas.Envelope[schemas.UpdateResult])
def delete_vectors(body: schemas.DeleteVectors, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Qdrant's delete_vectors: remove the named vectors of points (by ids or a filter)."""
    t0 = time.perf_counter()
    if body.points is not None:
        svc.check_batch(len(body.points), "ids")
    return ok(update_result(*c.delete_vectors(body.points, body.filter, body.vector)), t0)


@router.post("/collections/{name}/points/delete", response_model=schemas.Envelope[schemas.UpdateResult])
def delete_points(body: schemas.DeletePoints, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """By ids, or every point a filter lets through."""
    t0 = time.perf_counter()
    if body.filter is not None:
        seq, existed = c.delete_filtered(body.filter)
    else:
        svc.check_batch(len(body.points), "ids")
        seq, existed = c.delete(body.points)
    return ok(update_result(seq, existed), t0)


@router.get("/collections/{name}/points/count", response_model=schemas.Envelope[schemas.CountResult])
def count(c: Collection = Depends(collection)):
    t0 = time.perf_counter()
    return ok({"count": c.count()}, t0)


@router.post("/collections/{name}/points/count", response_model=schemas.Envelope[schemas.CountResult])
def count_filtered(body: schemas.CountRequest, c: Collection = Depends(collection)):
    """Qdrant's count: every point, or those a filter lets through (always exact)."""
    t0 = time.perf_counter()
    n = c.count() if body.filter is None else c.count_filtered(body.filter)
    return ok({"count": n}, t0)


@router.get("/collections/{name}/points/{point_id}", response_model=schemas.Envelope[schemas.Record])
def get_point(point_id: str = Path(max_length=45, description="an integer id or a UUID"), with_vector: bool = True,
              c: Collection = Depends(collection)):
    """Qdrant's GET of a point: its payload and every vector."""
    t0 = time.perf_counter()
    try:
        point_id = schemas.parse_path_id(point_id)
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    return ok(c.get(point_id, with_vector), t0)


@router.post("/collections/{name}/points", response_model=schemas.Envelope[list[schemas.Record]])
def retrieve(body: schemas.RetrieveRequest, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Qdrant's retrieve: the stored points among the ids (absent ones left out)."""
    t0 = time.perf_counter()
    svc.check_batch(len(body.ids), "ids")
    records = c.records(body.ids, wants_payload(body.with_payload), body.with_vector)
    return ok([record_json(r, body.with_payload) for r in records], t0)


@router.post("/collections/{name}/points/scroll", response_model=schemas.Envelope[schemas.ScrollResult])
def scroll(body: schemas.ScrollRequest, c: Collection = Depends(collection)):
    """Points by ascending id, a page at a time; `next_page_offset` is the next page's `offset`.
    A page holds at most max_limit points: a larger `limit` gets that many and the offset of the
    rest (clients page on; Haystack asks for 10,000)."""
    t0 = time.perf_counter()
    limit = min(body.limit, c.config.max_limit)
    records, nxt = c.scroll(body.filter, body.offset, limit, wants_payload(body.with_payload), body.with_vector)
    return ok({"points": [record_json(r, body.with_payload) for r in records], "next_page_offset": nxt}, t0)


def payload_write(svc: Service, c: Collection, points, filter, change) -> dict:
    if points is not None:
        svc.check_batch(len(points), "ids")
    return update_result(*c.update_payloads(points, filter, change))


@router.post("/collections/{name}/points/payload", response_model=schemas.Envelope[schemas.UpdateResult])
def set_payload(body: schemas.SetPayload, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Set these payload keys (others stay) on the points given by ids or a filter."""
    t0 = time.perf_counter()
    return ok(payload_write(svc, c, body.points, body.filter, lambda p: {**p, **body.payload}), t0)


@router.put("/collections/{name}/points/payload", response_model=schemas.Envelope[schemas.UpdateResult])
def overwrite_payload(body: schemas.SetPayload, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Replace the whole payload of the points given by ids or a filter."""
    t0 = time.perf_counter()
    return ok(payload_write(svc, c, body.points, body.filter, lambda p: dict(body.payload)), t0)


@router.post("/collections/{name}/points/payload/delete", response_model=schemas.Envelope[schemas.UpdateResult])
def delete_payload_keys(body: schemas.DeletePayload, c: Collection = Depends(collection),
                        svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    keys = set(body.keys)
    return ok(payload_write(svc, c, body.points, body.filter,
                            lambda p: {k: v for k, v in p.items() if k not in keys}), t0)


@router.post("/collections/{name}/points/payload/clear", response_model=schemas.Envelope[schemas.UpdateResult])
def clear_payload(body: schemas.DeletePoints, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    return ok(payload_write(svc, c, body.points, body.filter, lambda p: None), t0)
