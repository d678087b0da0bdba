"""Query planning: a request's searches, grouped by their options, under one budget.

Searches that share their options go through the shortlist and the decoder in one call; a lone
search may join the other lone searches on the collection (the caller's micro-batcher).  A
query names a vector, a stored point (whose vector is read, and the point itself left out), or
nothing: then it lists the points by ascending id (score 0), as Qdrant does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from model.threads import use_threads

from ..errors import BadRequest
from . import reads
from .reads import MAX_VECTOR_VALUES, returned_dimensions
from .search import MAX_RESCORE_VALUES, Hit, SearchBudget, is_light

if TYPE_CHECKING:  # annotations only: the collection imports this module
    from .collection import Collection

MAX_SEARCH_GROUPS = 64  # different option sets in one request: each evaluates its filter and scans alone


@dataclass
class Query:
    """One search of a request, in the engine's terms."""
    target: Any  # a vector, a stored point's id (int or UUID), or None: list the points by id
    limit: int = 10
    offset: int = 0
    score_threshold: float | None = None
    params: dict | None = None  # nprobe, ef_search, nshort, target_recall, exact, rescore, oversampling
    filter: Any = None
    with_payload: bool = False
    with_vector: Any = False  # False, True (every vector) or a list of names
    using: str | None = None  # the vector space searched (None: the unnamed vector)
    mmr: dict | None = None  # Qdrant's maximal marginal relevance: {"diversity", "candidates_limit"}
    options: str = ""  # its options as the request spells them: queries that share them share a call

    @property
    def by_point(self) -> bool:
        return isinstance(self.target, (int, str))


def check_limit(c: Collection, limit: int):
    if limit > c.config.max_limit:
        raise BadRequest(f"limit must be at most {c.config.max_limit}, got {limit}")


def search_group(c: Collection, group: list[Query], budget: SearchBudget | None = None,
                 exclude: list[set] | None = None) -> list[list[Hit]]:
    """Searches that share their options, in one call.  Without a budget, each search gets the
    budget of a request of its own (a micro-batch of lone requests)."""
    first = group[0]
    budget = budget or SearchBudget(c.config.max_search_candidates * len(group), MAX_VECTOR_VALUES * len(group),
                                    MAX_RESCORE_VALUES * len(group))
    return c.search([q.target for q in group], first.limit + first.offset, first.params, first.with_payload,
                    first.with_vector, budget=budget, filter=first.filter, exclude=exclude, using=first.using)


Batch = Callable[[Query], list[Hit]]  # runs a lone search with the others on the collection (a micro-batcher)


def run_searches(c: Collection, searches: list[Query], exclude: list[set] | None = None,
                 budget: SearchBudget | None = None, batch: Batch | None = None) -> list[list[Hit]]:
    """Searches by vector: one call per set of options, one candidate budget for the request.  A
    request of one search goes through `batch` (the collection's micro-batcher) when given."""
    use_threads(c.config.threads)
    results: list = [None] * len(searches)
    # Batched only alone: a request's own budget (shared with its other parts) is not the batch's.
    lone = (len(searches) == 1 and not (exclude and exclude[0]) and budget is None and batch is not None
            and c.config.search_batching)
    groups: dict = {}
    for i, s in enumerate(searches):
        check_limit(c, s.limit + s.offset)
        groups.setdefault(s.options, []).append(i)
        if len(groups) > MAX_SEARCH_GROUPS:
            raise BadRequest(f"a batch may hold at most {MAX_SEARCH_GROUPS} different sets of search "
                             f"options (limit, params, filter, ...)")
    budget = budget or SearchBudget(c.config.max_search_candidates)
    for members in groups.values():
        first = searches[members[0]]
        if lone:
            hits = [batch(first)]
        else:
            hits = search_group(c, [searches[i] for i in members], budget,
                                [exclude[i] for i in members] if exclude else None)
        for i, h in zip(members, hits):
            results[i] = kept(c, first, h)
    return results


def kept(c: Collection, q: Query, hits: list[Hit]) -> list[Hit]:
    """A query's hits after its offset and score threshold."""
    hits = hits[q.offset:]
    if q.score_threshold is not None:
        t = q.score_threshold
        cosine = c.space_named(q.using).metric == "cosine"
        hits = [h for h in hits if (h.score >= t if cosine else h.score <= t)]
    return hits


def run_queries(c: Collection, queries: list[Query], batch: Batch | None = None) -> list[list[Hit]]:
    """Each query's hits: those with a target searched together, the others listings (each distinct
    one once).  One budget for all."""
    use_threads(c.config.threads)
    for q in queries:
        check_limit(c, q.limit + q.offset)
    listings: dict = {}
    for i, q in enumerate(queries):
        if q.target is None:
            listings.setdefault(q.options, []).append(i)
    if len(listings) > MAX_SEARCH_GROUPS:
        raise BadRequest(f"a batch may hold at most {MAX_SEARCH_GROUPS} different queries without `query`")
    budget = SearchBudget(c.config.max_search_candidates)
    results: list = [None] * len(queries)
    ranked = [i for i, q in enumerate(queries) if q.target is not None]
    if ranked:
        searches, exclude = by_vector(c, [mmr_candidates(c, queries[i]) if queries[i].mmr else queries[i]
                                          for i in ranked])
        for i, hits in zip(ranked, run_searches(c, searches, exclude, budget if listings else None, batch)):
            results[i] = mmr_select(c, queries[i], hits) if queries[i].mmr else hits
    for members in listings.values():
        q = queries[members[0]]
        budget.take(len(members), q.limit + q.offset, 0, bool(q.with_vector), returned_dimensions(c, q.with_vector))
        records, _ = c.scroll(q.filter, None, q.limit + q.offset, q.with_payload, q.with_vector)
        hits = [Hit(r["id"], 0.0, r["payload"], r.get("vector")) for r in records[q.offset:]]
        for i in members:
            results[i] = hits
    return results


def by_vector(c: Collection, queries: list[Query]) -> tuple[list[Query], list[set]]:
    """Queries as searches by vector: a stored point's vector replaces its id (the stored points of
    a batch are read together), and the point is left out of its own hits."""
    stored = {}  # (using, id) -> the point's vector in that space
    for using in {q.using for q in queries if q.by_point}:
        by_id = list(dict.fromkeys(q.target for q in queries if q.by_point and q.using == using))
        stored.update(((using, i), v) for i, v in zip(by_id, c.vectors_of(by_id, c.space_named(using))))
    searches, exclude = [], []
    for q in queries:
        searches.append(replace(q, target=stored[q.using, q.target]) if q.by_point else q)
        exclude.append({q.target} if q.by_point else set())
    return searches, exclude


def mmr_candidates(c: Collection, q: Query) -> Query:
    """An MMR query's search: its candidates (candidates_limit, at least limit + offset), nearest
    first, with their vectors in the space searched."""
    returned_dimensions(c, q.with_vector)  # an unknown name: BadRequest before any search
    n = max(q.mmr.get("candidates_limit") or 0, q.limit + q.offset)
    if n > c.config.max_limit:
        raise BadRequest(f"mmr candidates_limit must be at most {c.config.max_limit}, got {n}")
    name = c.space_named(q.using).name
    return replace(q, limit=n, offset=0, with_vector=[name], options=f"{q.options} mmr {n}")


def mmr_select(c: Collection, q: Query, candidates: list[Hit]) -> list[Hit]:
    """Qdrant's maximal marginal relevance: the nearest candidate first, then each time the one
    that maximises (1 - diversity) * relevance - diversity * (its largest similarity to those
    already picked); similarity is the collection's (cosine, or minus the Euclidean distance).
    Hits keep their scores and the vectors the query asked for."""
    space = c.space_named(q.using)
    cosine = space.metric == "cosine"
    own = [h.vector.get(space.name) if isinstance(h.vector, dict) else h.vector for h in candidates]
    candidates = [h for h, v in zip(candidates, own) if v is not None]  # deleted since the search
    if not candidates:
        return []
    V = np.array([v for v in own if v is not None], dtype=np.float32)
    if cosine:
        V /= np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
    relevance = np.array([h.score if cosine else -h.score for h in candidates])
    diversity = q.mmr.get("diversity")
    diversity = 0.5 if diversity is None else diversity
    nearest = np.full(len(V), -np.inf)  # each candidate's largest similarity to those picked
    open_ = np.ones(len(V), dtype=bool)
    picked = []
    for _ in range(min(len(V), q.limit + q.offset)):
        score = relevance if not picked else (1 - diversity) * relevance - diversity * nearest
        j = int(np.argmax(np.where(open_, score, -np.inf)))
        picked.append(j)
        open_[j] = False
        nearest = np.maximum(nearest, V @ V[j] if cosine else -np.linalg.norm(V - V[j], axis=1))
    hits = [candidates[j] for j in picked[q.offset:]]
    if not q.with_vector:
        return [replace(h, vector=None) for h in hits]
    internal = c.internal_ids([h.id for h in hits])
    vectors = reads.vectors_json(c, internal, q.with_vector)
    return [replace(h, vector=vectors[i]) for h, i in zip(hits, internal)]


def recommend(c: Collection, positive: list, limit: int, params: dict | None, filter, with_payload: bool,
              using: str | None = None) -> list[Hit]:
    """Neighbours of stored points (their mean vector in the space `using`), the points themselves
    left out."""
    use_threads(c.config.threads)
    check_limit(c, limit)
    query = c.vectors_of(positive, c.space_named(using)).mean(0)
    return c.search([query], limit, params, with_payload, False, exclude=[set(positive)],
                    budget=SearchBudget(c.config.max_search_candidates), filter=filter, using=using)[0]


def is_light_query(c: Collection, q: Query) -> bool:
    """Whether a lone search by vector is cheap enough to run in the event loop: no filter, no
    vectors to return, and few decodes (search.is_light)."""
    return (isinstance(q.target, list) and q.filter is None and not q.with_vector and q.mmr is None
            and is_light(c.space_named(q.using), q.params, q.limit + q.offset))
