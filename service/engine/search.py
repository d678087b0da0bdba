"""One search call on a collection's vector space: its budget, its parameters, the filter, the
index search under the index lock, the rescore with the originals, and the hits."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.threads import use_threads

from ..errors import BadRequest
from . import reads
from .reads import MAX_VECTOR_VALUES, returned_dimensions

if TYPE_CHECKING:  # annotations only: the collection imports this module
    from .collection import Collection
    from .space import VectorSpace

MAX_RESCORE = 10_000  # candidates re-ranked with their originals in one query (but limit + offset)
# Candidates a rescore ranks at least when the request sets no nshort: reading an original costs
# ~1 us warm (~15 us cold, the reads issued together), and at limit 10 8-byte codes need ~10x the
# limit for 0.95 of queries to find their nearest (real 1M MiniLM set, RESULTS "Session 18").
RESCORE_SHORTLIST = 128
# Originals read back by one request's rescores (queries x candidates x dimensions): 2,000 queries
# of 128 candidates at d = 384.  The reads go a block of queries at a time, candidates x dimensions
# of RESCORE_BLOCK_VALUES (a few arrays of 16 MB); a query's candidates are capped to fit, unless
# its limit (+ offset) alone does not (then as much as returning its vectors would take).
MAX_RESCORE_VALUES = 100_000_000
RESCORE_BLOCK_VALUES = 4_000_000
LIGHT_SEARCH_MACS = 12_000_000  # a lone search this cheap runs in the event loop (~0.3-0.5 ms of one core)
LIGHT_SEARCH_LIMIT = 100  # results (limit + offset) of such a search: payloads are read in the loop too


class SearchBudget:
    """What one request may ask of the searches it makes: shortlist candidates (queries x
    max(limit, nshort)), numbers of returned vectors and of the original values its rescores
    read.  Shared by the groups of a batch."""

    def __init__(self, candidates: int, vector_values: int = MAX_VECTOR_VALUES, originals: int = MAX_RESCORE_VALUES):
        self.max_candidates, self.max_vector_values, self.max_originals = candidates, vector_values, originals
        self.candidates, self.vector_values, self.originals = candidates, vector_values, originals  # what is left

    def take(self, nq: int, limit: int, nshort: int, with_vector: bool, d: int, returned: int | None = None):
        """nq queries of `limit` candidates each (a shortlist of nshort), `returned` of them (default
        limit) with their d-dimensional vectors."""
        candidates = nq * max(limit, nshort)
        if candidates > self.candidates:
            raise BadRequest(f"this request asks for more than {self.max_candidates} search candidates (queries x "
                             f"max(limit, nshort)): send fewer queries or a smaller nshort")
        values = nq * (limit if returned is None else returned) * d if with_vector else 0
        if values > self.vector_values:
            raise BadRequest(f"this request would return more than {self.max_vector_values} vector values: ask for "
                             f"fewer results or without with_vector")
        self.candidates -= candidates
        self.vector_values -= values

    def take_originals(self, nq: int, candidates: int, d: int):
        """nq queries rescoring `candidates` each with their d-dimensional originals."""
        values = nq * candidates * d
        if values > self.originals:
            raise BadRequest(f"this request would rescore more than {self.max_originals} original vector values "
                             f"(queries x candidates x dimensions): send fewer queries, or a smaller oversampling or "
                             f"nshort")
        self.originals -= values


@dataclass
class Hit:
    id: int | str  # the client's id (an integer or a UUID)
    score: float
    payload: dict | None = None
    vector: list[float] | None = None


def search(c: Collection, space: VectorSpace, queries, limit: int, params: dict | None, with_payload: bool,
           with_vector, exclude: list[set] | None = None, budget: SearchBudget | None = None,
           filter=None) -> list[list[Hit]]:
    """Nearest stored points of each query in a vector space (points without a vector there are
    not candidates); `filter` restricts them; `exclude` (client ids per query) leaves points out.
    with_vector: False, True (every vector of the hits) or a list of names.

    params: nprobe, ef_search, nshort, target_recall, exact, rescore, oversampling.  Before its
    first model a space searches its originals exactly and ignores them."""
    use_threads(c.config.threads)
    x = space.prepare(queries)
    params = params or {}
    exclude = [set(c.internal_ids(list(e))) for e in exclude] if exclude else None
    extra = max((len(e) for e in exclude), default=0) if exclude else 0
    resolve = c.has_id_resolver(filter)
    try:
        with c.locks.index.read():  # one index throughout, even if a swap replaces it meanwhile
            index = space.index
            # Qdrant ignores quantization settings that do not apply: so does rescore without
            # originals, or over an exact index (exact already).
            rescore = bool(params.get("rescore")) and space.keeps_originals and not index.exact
            k = limit + extra
            sp = index.search_params(params)
            if rescore:  # Qdrant's oversampling: more candidates, re-ranked with the originals
                k = math.ceil(k * (params.get("oversampling") or 1.0))
                if not params.get("exact"):  # and the shortlist: the originals rank it better than the decoder
                    k = max(k, sp.nshort, RESCORE_SHORTLIST if params.get("nshort") is None else 0)
                k = max(limit + extra, min(MAX_RESCORE, k, RESCORE_BLOCK_VALUES // index.d))  # never fewer results
                if sp.nshort <= k:  # the shortlist is the k candidates: the decoder need not rank them
                    sp = dataclasses.replace(sp, nshort=0)
            budget = budget or SearchBudget(c.config.max_search_candidates)
            budget.take(len(x), k, sp.nshort if sp else 0, bool(with_vector), returned_dimensions(c, with_vector),
                        returned=limit + extra)
            if rescore:
                budget.take_originals(len(x), k, index.d)
            allowed = c.filter_ids(filter, resolve) if filter is not None else None
            D, I = index.search(x, k, sp, allowed_ids=allowed)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if rescore:
        D, I = rescored(space, x, D, I)
    if not np.isfinite(D).all():  # float32 overflow: a query far outside the model's range
        raise BadRequest("the query vector's values are too large for this collection's model")
    return hits(c, space, D, I, limit, extra, exclude, with_payload, with_vector)


def hits(c: Collection, space: VectorSpace, D: np.ndarray, I: np.ndarray, limit: int, extra: int,
         exclude: list[set] | None, with_payload: bool, with_vector) -> list[list[Hit]]:
    """Each query's hits: excluded and since-deleted points left out, Qdrant's scores."""
    payloads = c.record.payloads({int(i) for i in I[:, :limit + extra].ravel()}) if with_payload else {}
    vectors = {}
    if with_vector:
        found = np.unique(I[:, :limit + extra][I[:, :limit + extra] >= 0])  # not every rescore candidate
        vectors = reads.vectors_json(c, found[c.points.contains(found)], with_vector)  # not deleted since
    results = []
    cosine = space.metric == "cosine"
    for q in range(len(D)):
        out = []
        for dist, i in zip(D[q].tolist(), I[q].tolist()):  # Python floats and ints: no numpy scalars
            if i < 0 or (exclude and i in exclude[q]):
                continue
            if (with_payload and i not in payloads) or (with_vector and i not in vectors):
                continue  # deleted since the search: its row is gone
            # Qdrant's scores: cosine similarity, or the Euclidean distance (not its square)
            score = 1 - dist / 2 if cosine else math.sqrt(max(dist, 0.0))
            vector = vectors[i] if with_vector else None
            out.append(Hit(c.point_ids.external(i), score, payloads.get(i) if with_payload else None, vector))
            if len(out) == limit:
                break
        results.append(out)
    return results


def rescored(space: VectorSpace, x: np.ndarray, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates re-ranked by the exact distance to their original vectors (read from disk), a
    block of queries at a time (memory: RESCORE_BLOCK_VALUES).  One deleted meanwhile (no
    original) is dropped (id -1) rather than ranked by another distance."""
    block = max(1, RESCORE_BLOCK_VALUES // max(1, I.shape[1] * x.shape[1]))  # no candidates: one block
    for q0 in range(0, len(I), block):
        D[q0:q0 + block], I[q0:q0 + block] = _rescored_block(space, x[q0:q0 + block], I[q0:q0 + block])
    return D, I


def _rescored_block(space: VectorSpace, x: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    found = np.unique(I[I >= 0])
    originals = space.record.originals(found)
    table = np.zeros((len(found) + 1, x.shape[1]), dtype=np.float32)  # last row: "no original"
    known = np.zeros(len(found) + 1, dtype=bool)
    for r, i in enumerate(found.tolist()):
        if i in originals:
            table[r], known[r] = originals[i], True
    rows = np.where(I >= 0, np.searchsorted(found, I), len(found))
    D = np.where(known[rows], ((x[:, None, :] - table[rows]) ** 2).sum(-1), np.inf).astype(np.float32)
    order = np.argsort(D, axis=1, kind="stable")
    D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    gone = ~np.isfinite(D)
    D[gone], I[gone] = 0.0, -1  # skipped by `hits`
    return D, I


def is_light(space: VectorSpace, params: dict | None, limit: int) -> bool:
    """Whether one unfiltered query with these options costs at most LIGHT_SEARCH_MACS (a fraction
    of a millisecond): the service runs such a search in the event loop when it is the only
    request, where a thread hop would cost more than the search.  Not light: exact, rescore or
    target_recall options, a long result list, or what the index cannot cost (an exact index)."""
    params = params or {}
    if params.get("rescore") or params.get("exact") or params.get("target_recall") is not None \
            or limit > LIGHT_SEARCH_LIMIT:
        return False
    index = space.index
    cost = index.search_cost(index.search_params(params), limit)
    return cost is not None and cost <= LIGHT_SEARCH_MACS
