"""Search: by vector (one or a batch), Qdrant's query (a vector or a stored point), recommend."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from .. import schemas
from ..deps import ApiError, Service, collection, hit_json, ok, ready, wants_payload
from ..store import Collection, SearchBudget

router = APIRouter(tags=["search"], responses=schemas.ERROR_RESPONSES)
MAX_SEARCH_GROUPS = 64  # different option sets in one batch: each evaluates its filter and scans alone


def run_search(svc: Service, c: Collection, searches: list, exclude: list[set[int]] | None = None) -> list[list[dict]]:
    """Searches (SearchRequest): those that share their options go through the shortlist and the
    decoder together; one candidate budget for the whole request."""
    results: list = [None] * len(searches)
    groups: dict = {}
    for i, s in enumerate(searches):
        svc.check_limit(s.limit + s.offset)
        groups.setdefault(s.model_dump_json(exclude={"vector"}), []).append(i)
        if len(groups) > MAX_SEARCH_GROUPS:
            raise ApiError(400, f"a batch may hold at most {MAX_SEARCH_GROUPS} different sets of search "
                                f"options (limit, params, filter, ...)")
    t0 = time.perf_counter()
    budget = SearchBudget(svc.settings.max_search_candidates)
    for members in groups.values():
        first = searches[members[0]]
        hits = svc.call(c.search, [searches[i].vector for i in members], first.limit + first.offset,
                        first.params.for_store() if first.params else None, wants_payload(first.with_payload),
                        first.with_vector, budget=budget, filter=first.filter,
                        exclude=[exclude[i] for i in members] if exclude else None)
        for i, h in zip(members, hits):
            h = h[first.offset:]
            if first.score_threshold is not None:
                t = first.score_threshold
                h = [x for x in h if (x.score >= t if c.metric == "cosine" else x.score <= t)]
            results[i] = [hit_json(x, first.with_payload) for x in h]
    svc.metrics.search.observe(time.perf_counter() - t0)
    return results


@router.post("/collections/{name}/points/search", response_model=schemas.Envelope[list[schemas.ScoredPoint]])
def search(body: schemas.SearchRequest, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    return ok(run_search(svc, c, [body])[0], t0)


@router.post("/collections/{name}/points/search/batch", response_model=schemas.Envelope[list[list[schemas.ScoredPoint]]])
def search_batch(body: schemas.SearchBatch, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    svc.check_batch(len(body.searches), "searches")
    return ok(run_search(svc, c, body.searches), t0)


@router.post("/collections/{name}/points/recommend", response_model=schemas.Envelope[list[schemas.ScoredPoint]])
def recommend(body: schemas.RecommendRequest, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Neighbours of stored points (their mean decoded vector), the points themselves excluded."""
    t0 = time.perf_counter()
    svc.check_limit(body.limit)
    vectors = [svc.call(c.vector, i) for i in body.positive]
    query = sum(vectors) / len(vectors)
    hits = svc.call(c.search, [query], body.limit, body.params.for_store() if body.params else None,
                    body.with_payload, False, exclude=[set(body.positive)],
                    budget=SearchBudget(svc.settings.max_search_candidates), filter=body.filter)[0]
    return ok([hit_json(x, body.with_payload) for x in hits], t0)


def as_searches(svc: Service, c: Collection, queries: list[schemas.QueryRequest]):
    """Queries as searches: their vector given, or a stored point's (which is then left out)."""
    searches, exclude = [], []
    for q in queries:
        target = q.query.nearest if isinstance(q.query, schemas.NearestQuery) else q.query
        if isinstance(target, int):
            vector, skip = svc.call(c.vector, target), {target}
        else:
            vector, skip = target, set()
        searches.append(schemas.SearchRequest.model_construct(
            vector=vector, limit=q.limit, offset=q.offset, score_threshold=q.score_threshold, params=q.params,
            filter=q.filter, with_payload=q.with_payload, with_vector=q.with_vector))
        exclude.append(skip)
    return searches, exclude


@router.post("/collections/{name}/points/query", response_model=schemas.Envelope[schemas.QueryResponse])
def query_points(body: schemas.QueryRequest, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Qdrant's universal query, for one dense vector: {"points": [ScoredPoint]}."""
    t0 = time.perf_counter()
    searches, exclude = as_searches(svc, c, [body])
    return ok({"points": run_search(svc, c, searches, exclude)[0]}, t0)


@router.post("/collections/{name}/points/query/batch", response_model=schemas.Envelope[list[schemas.QueryResponse]])
def query_batch(body: schemas.QueryBatch, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    svc.check_batch(len(body.searches), "queries")
    searches, exclude = as_searches(svc, c, body.searches)
    return ok([{"points": hits} for hits in run_search(svc, c, searches, exclude)], t0)
