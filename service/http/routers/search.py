"""Search: by vector (one or a batch), Qdrant's query (a vector or a stored point), recommend.
The planning is the engine's (engine/query.py); these routes translate requests and hits."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from ...engine import query
from ...engine.collection import Collection
from .. import schemas
from ..deps import JsonRoute, Service, collection, off_loop, ready
from ..responses import hit_json, ok, wants_payload

router = APIRouter(route_class=JsonRoute, tags=["search"], responses=schemas.ERROR_RESPONSES)


def options(r: schemas.SearchRequest | schemas.QueryRequest) -> str:
    """A search's options as JSON, spelled alike for both requests: searches that share them
    share a call (and a micro-batch)."""
    return schemas.QueryRequest.model_construct(
        limit=r.limit, offset=r.offset, score_threshold=r.score_threshold, params=r.params, filter=r.filter,
        with_payload=r.with_payload, with_vector=r.with_vector, using=r.using or None,
    ).model_dump_json(exclude={"query", "prefetch", "lookup_from"})


def as_query(r: schemas.SearchRequest | schemas.QueryRequest, keyed: bool = True) -> query.Query:
    """The engine's query for a request; keyed: with its options' JSON (not needed to tell
    whether it is light, and not made in the event loop for nothing)."""
    target = r.target  # a vector; a query's may be a stored point's id, or None: the points by id
    if not keyed:
        key = ""
    elif target is None:  # a listing: the whole request is its options
        key = r.model_dump_json()
    else:
        key = options(r)
    mmr = r.query.mmr if isinstance(r, schemas.QueryRequest) and isinstance(r.query, schemas.NearestQuery) else None
    return query.Query(target, r.limit, r.offset, r.score_threshold, r.params.for_store() if r.params else None,
                       r.filter, wants_payload(r.with_payload), r.with_vector, r.using or None,
                       mmr.model_dump() if mmr else None, key)


def searched(svc: Service, c: Collection, requests: list[schemas.SearchRequest]) -> list[list[dict]]:
    t0 = time.perf_counter()
    hits = query.run_searches(c, [as_query(r) for r in requests], batch=svc.lone_search(c))
    svc.metrics.search.observe(time.perf_counter() - t0)
    return [[hit_json(h, r.with_payload) for h in found] for r, found in zip(requests, hits)]


def queried(svc: Service, c: Collection, requests: list[schemas.QueryRequest]) -> list[dict]:
    t0 = time.perf_counter()
    hits = query.run_queries(c, [as_query(r) for r in requests], batch=svc.lone_search(c))
    if any(r.query is not None for r in requests):
        svc.metrics.search.observe(time.perf_counter() - t0)
    return [{"points": [hit_json(h, r.with_payload) for h in found]} for r, found in zip(requests, hits)]


@router.post("/collections/{name}/points/search", response_model=schemas.Envelope[list[schemas.ScoredPoint]])
async def search(body: schemas.SearchRequest, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    light = query.is_light_query(c, as_query(body, keyed=False))
    return ok((await off_loop(svc, light, searched, svc, c, [body]))[0], t0)


@router.post("/collections/{name}/points/search/batch", response_model=schemas.Envelope[list[list[schemas.ScoredPoint]]])
def search_batch(body: schemas.SearchBatch, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    svc.check_batch(len(body.searches), "searches")
    return ok(searched(svc, c, body.searches), t0)


@router.post("/collections/{name}/points/recommend", response_model=schemas.Envelope[list[schemas.ScoredPoint]])
def recommend(body: schemas.RecommendRequest, c: Collection = Depends(collection)):
    """Neighbours of stored points (their mean decoded vector), the points themselves excluded."""
    t0 = time.perf_counter()
    hits = query.recommend(c, body.positive, body.limit, body.params.for_store() if body.params else None,
                           body.filter, body.with_payload, body.using)
    return ok([hit_json(h, body.with_payload) for h in hits], t0)


@router.post("/collections/{name}/points/query", response_model=schemas.Envelope[schemas.QueryResponse])
async def query_points(body: schemas.QueryRequest, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Qdrant's universal query, for one dense vector: {"points": [ScoredPoint]}."""
    t0 = time.perf_counter()
    light = query.is_light_query(c, as_query(body, keyed=False))
    return ok((await off_loop(svc, light, queried, svc, c, [body]))[0], t0)


@router.post("/collections/{name}/points/query/batch", response_model=schemas.Envelope[list[schemas.QueryResponse]])
def query_batch(body: schemas.QueryBatch, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    svc.check_batch(len(body.searches), "queries")
    return ok(queried(svc, c, body.searches), t0)
