"""Search: by vector (one or a batch), Qdrant's query (a vector or a stored point), recommend."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from .. import schemas
from ..deps import ApiError, JsonRoute, Service, collection, hit_json, off_loop, ok, ready, wants_payload
from ..store import MAX_VECTOR_VALUES, Collection, Hit, SearchBudget

router = APIRouter(route_class=JsonRoute, tags=["search"], responses=schemas.ERROR_RESPONSES)
MAX_SEARCH_GROUPS = 64  # different option sets in one batch: each evaluates its filter and scans alone


def search_group(svc: Service, c: Collection, group: list, budget: SearchBudget | None = None,
                 exclude: list[set] | None = None) -> list[list[Hit]]:
    """Searches (SearchRequest) that share their options, in one call.  Without a budget, each
    search gets the budget of a request of its own (a micro-batch of lone requests)."""
    first = group[0]
    budget = budget or SearchBudget(svc.settings.max_search_candidates * len(group), MAX_VECTOR_VALUES * len(group))
    return svc.call(c.search, [s.vector for s in group], first.limit + first.offset,
                    first.params.for_store() if first.params else None, wants_payload(first.with_payload),
                    first.with_vector, budget=budget, filter=first.filter, exclude=exclude)


def run_search(svc: Service, c: Collection, searches: list, exclude: list[set] | None = None,
               budget: SearchBudget | None = None) -> list[list[dict]]:
    """Searches (SearchRequest): those that share their options go through the shortlist and the
    decoder together; one candidate budget for the whole request.  A request of one search joins
    the other lone searches on the collection that run at the same time (service/batching.py)."""
    results: list = [None] * len(searches)
    # Batched only alone: a request's own budget (shared with its other parts) is not the batch's.
    lone = len(searches) == 1 and not (exclude and exclude[0]) and budget is None and svc.settings.search_batching
    groups: dict = {}
    for i, s in enumerate(searches):
        svc.check_limit(s.limit + s.offset)
        groups.setdefault(s.model_dump_json(exclude={"vector"}), []).append(i)
        if len(groups) > MAX_SEARCH_GROUPS:
            raise ApiError(400, f"a batch may hold at most {MAX_SEARCH_GROUPS} different sets of search "
                                f"options (limit, params, filter, ...)")
    t0 = time.perf_counter()
    budget = budget or SearchBudget(svc.settings.max_search_candidates)
    for key, members in groups.items():
        first = searches[members[0]]
        if lone:
            hits = [svc.batcher(c, lambda coll, group: search_group(svc, coll, group)).search(first, key)]
        else:
            hits = search_group(svc, c, [searches[i] for i in members], budget,
                                [exclude[i] for i in members] if exclude else None)
        for i, h in zip(members, hits):
            h = h[first.offset:]
            if first.score_threshold is not None:
                t = first.score_threshold
                h = [x for x in h if (x.score >= t if c.metric == "cosine" else x.score <= t)]
            results[i] = [hit_json(x, first.with_payload) for x in h]
    svc.metrics.search.observe(time.perf_counter() - t0)
    return results


def is_light(c: Collection, s: schemas.SearchRequest | schemas.QueryRequest) -> bool:
    """Whether a lone search by vector is cheap enough to run in the event loop (deps.off_loop):
    no filter, no vectors to return, and few decodes (Collection.is_light_search)."""
    vector = s.vector if isinstance(s, schemas.SearchRequest) else (
        s.query.nearest if isinstance(s.query, schemas.NearestQuery) else s.query)
    return (isinstance(vector, list) and s.filter is None and not s.with_vector
            and c.is_light_search(s.params.for_store() if s.params else None, s.limit + s.offset))


@router.post("/collections/{name}/points/search", response_model=schemas.Envelope[list[schemas.ScoredPoint]])
async def search(body: schemas.SearchRequest, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    return ok((await off_loop(svc, is_light(c, body), run_search, svc, c, [body]))[0], t0)


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
    query = svc.call(c.vectors_of, body.positive).mean(0)
    hits = svc.call(c.search, [query], body.limit, body.params.for_store() if body.params else None,
                    body.with_payload, False, exclude=[set(body.positive)],
                    budget=SearchBudget(svc.settings.max_search_candidates), filter=body.filter)[0]
    return ok([hit_json(x, body.with_payload) for x in hits], t0)


def as_searches(svc: Service, c: Collection, queries: list[schemas.QueryRequest]):
    """Queries as searches: their vector given, or a stored point's (which is then left out; the
    stored points of a batch are read together)."""
    targets = [q.query.nearest if isinstance(q.query, schemas.NearestQuery) else q.query for q in queries]
    by_id = [t for t in targets if isinstance(t, (int, str))]
    stored = dict(zip(by_id, svc.call(c.vectors_of, by_id))) if by_id else {}
    searches, exclude = [], []
    for q, target in zip(queries, targets):
        by_point = isinstance(target, (int, str))
        searches.append(schemas.SearchRequest.model_construct(
            vector=stored[target] if by_point else target, limit=q.limit, offset=q.offset,
            score_threshold=q.score_threshold, params=q.params, filter=q.filter, with_payload=q.with_payload,
            with_vector=q.with_vector))
        exclude.append({target} if by_point else set())
    return searches, exclude


def run_queries(svc: Service, c: Collection, queries: list[schemas.QueryRequest]) -> list[dict]:
    """Qdrant's QueryResponse for each query: searches together; those without `query` list the
    points by ascending id (score 0), as Qdrant does, each distinct one once.  One budget for all."""
    for q in queries:
        svc.check_limit(q.limit + q.offset)
    listings: dict = {}
    for i, q in enumerate(queries):
        if q.query is None:
            listings.setdefault(q.model_dump_json(), []).append(i)
    if len(listings) > MAX_SEARCH_GROUPS:
        raise ApiError(400, f"a batch may hold at most {MAX_SEARCH_GROUPS} different queries without `query`")
    budget = SearchBudget(svc.settings.max_search_candidates)
    results: list = [None] * len(queries)
    ranked = [i for i, q in enumerate(queries) if q.query is not None]
    if ranked:
        searches, exclude = as_searches(svc, c, [queries[i] for i in ranked])
        for i, hits in zip(ranked, run_search(svc, c, searches, exclude, budget if listings else None)):
            results[i] = hits
    for members in listings.values():
        q = queries[members[0]]
        svc.call(budget.take, len(members), q.limit + q.offset, 0, q.with_vector, c.dimension)
        records, _ = svc.call(c.scroll, q.filter, None, q.limit + q.offset, wants_payload(q.with_payload),
                              q.with_vector)
        hits = [hit_json(Hit(r["id"], 0.0, r["payload"], r.get("vector")), q.with_payload) for r in records[q.offset:]]
        for i in members:
            results[i] = hits
    return [{"points": hits} for hits in results]


@router.post("/collections/{name}/points/query", response_model=schemas.Envelope[schemas.QueryResponse])
async def query_points(body: schemas.QueryRequest, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Qdrant's universal query, for one dense vector: {"points": [ScoredPoint]}."""
    t0 = time.perf_counter()
    return ok((await off_loop(svc, is_light(c, body), run_queries, svc, c, [body]))[0], t0)


@router.post("/collections/{name}/points/query/batch", response_model=schemas.Envelope[list[schemas.QueryResponse]])
def query_batch(body: schemas.QueryBatch, c: Collection = Depends(collection), svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    svc.check_batch(len(body.searches), "queries")
    return ok(run_queries(svc, c, body.searches), t0)
