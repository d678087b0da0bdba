"""Search: by vector (one or a batch), Qdrant's query (a vector or a stored point), recommend.
`score` is the Euclidean distance for l2 collections (lower is nearer) and the cosine
similarity for cosine collections (higher is nearer)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Discriminator, Field, Tag, model_validator

from .common import (MAX_EF_SEARCH, DenseVector, Finite, PointId, Strict, Vector, VectorName, WithPayload, WithVector,
                     list_or_dict, refuse_sparse)
from .filters import Filter


class QuantizationSearchParams(Strict):
    """Qdrant's: `rescore` re-ranks with the originals, `oversampling` x limit candidates first."""
    ignore: bool = False
    rescore: bool | None = None
    oversampling: float | None = Field(None, ge=1, le=100)


class SearchParams(Strict):
    """QINCo's search parameters, and Qdrant's where they apply (`hnsw_ef` is `ef_search`,
    `exact` probes every list, `quantization.rescore` is `rescore`; `indexed_only` is accepted
    and ignored).  A collection without a model yet searches exactly and ignores them."""
    nprobe: int | None = Field(None, ge=1, le=1 << 20, description="lists probed (at most nlist)")
    ef_search: int | None = Field(None, ge=1, le=MAX_EF_SEARCH)
    nshort: int | None = Field(None, ge=0, le=100_000,
                               description="candidates re-ranked by the neural decoder (0: none), or by the originals "
                                           "with rescore")
    target_recall: float | None = Field(None, gt=0, le=1)
    hnsw_ef: int | None = Field(None, ge=1, le=MAX_EF_SEARCH, description="Qdrant's name of ef_search")
    exact: bool = Field(False, description="probe every list, re-rank a wide shortlist")
    rescore: bool = Field(False, description="rank max(limit x oversampling, nshort) candidates by their original "
                                             "vectors, in place of the decoder (self-training collections that "
                                             "keep them); nshort unset: 128")
    quantization: QuantizationSearchParams | None = None
    indexed_only: bool = False

    @model_validator(mode="after")
    def raw_or_target(self):
        raw = any(v is not None for v in (self.nprobe, self.ef_search, self.nshort, self.hnsw_ef)) or self.exact
        if raw and self.target_recall is not None:
            raise ValueError("give either nprobe/ef_search/nshort/exact or target_recall, not both")
        if self.hnsw_ef is not None and self.ef_search is not None:
            raise ValueError("give ef_search or hnsw_ef, not both")
        return self

    def for_store(self) -> dict:
        q = self.quantization
        return {"nprobe": self.nprobe, "ef_search": self.ef_search or self.hnsw_ef, "nshort": self.nshort,
                "target_recall": self.target_recall, "exact": self.exact,
                "rescore": self.rescore or bool(q and q.rescore and not q.ignore),
                "oversampling": q.oversampling if q else None}


class NamedVector(Strict):
    """Qdrant's named form of a search vector."""
    name: VectorName
    vector: DenseVector


class SearchRequest(Strict):
    vector: Annotated[Annotated[DenseVector, Tag("list")] | Annotated[NamedVector, Tag("object")],
                      Discriminator(list_or_dict)]
    limit: int = Field(10, ge=1, le=10_000)
    offset: int = Field(0, ge=0, le=10_000, description="skip this many of the best results")
    score_threshold: Finite | None = Field(None, description="cosine: at least this similarity; l2: at most this distance")
    params: SearchParams | None = None
    filter: Filter | None = None
    with_payload: WithPayload = Field(False, description="payload in the hits (Qdrant's default: none)")
    with_vector: WithVector = False

    @property
    def using(self) -> str | None:
        return self.vector.name if isinstance(self.vector, NamedVector) else None

    @property
    def target(self) -> list[float]:
        return self.vector.vector if isinstance(self.vector, NamedVector) else self.vector


UNSUPPORTED_QUERIES = ("fusion", "rrf", "formula", "recommend", "discover", "context", "order_by", "sample")


def supported_query(value: Any) -> Any:
    """Qdrant's query kinds that need more than one dense vector get a message naming them."""
    if isinstance(value, dict):
        kind = next((k for k in UNSUPPORTED_QUERIES if k in value), None)
        if kind is not None:
            raise ValueError(f"query {kind!r} is not supported: queries are nearest neighbours of one dense vector "
                             f"or stored point (no hybrid, fusion or recommend queries)")
        refuse_sparse(value.get("nearest"))
    return refuse_sparse(value)


class Mmr(Strict):
    """Qdrant's maximal marginal relevance (diversity 0: by relevance only, 1: diversity only)."""
    diversity: float | None = Field(None, ge=0, le=1, description="default 0.5")
    candidates_limit: int | None = Field(None, ge=1, le=10_000, description="nearest points to choose from "
                                                                             "(default: limit)")


class NearestQuery(Strict):
    nearest: DenseVector | PointId
    mmr: Mmr | None = None


class QueryRequest(Strict):
    """Qdrant's universal query, for what a single dense vector can do: nearest to a vector,
    or to a stored point (by id); without `query`, the points by ascending id (score 0)."""
    query: Annotated[Vector | NearestQuery | PointId | None, BeforeValidator(supported_query)] = None
    filter: Filter | None = None
    params: SearchParams | None = None
    limit: int = Field(10, ge=1, le=10_000)
    offset: int = Field(0, ge=0, le=10_000)
    score_threshold: Finite | None = None
    with_payload: WithPayload = False
    with_vector: WithVector = False
    using: VectorName | None = Field(None, description="the named vector to search (null: the unnamed one)")
    prefetch: Any = Field(None, description="not supported: null only")
    lookup_from: Any = Field(None, description="not supported: null only")

    @model_validator(mode="after")
    def single_dense_vector(self):
        if self.prefetch is not None:
            raise ValueError("prefetch is not supported: no hybrid or multi-stage queries (fusion of several "
                             "searches); query one named vector with `using`")
        if self.lookup_from is not None:
            raise ValueError("lookup_from is not supported: a query by point id reads the point in this collection")
        return self

    @property
    def target(self):
        """A vector, a stored point's id, or None (the points by id)."""
        return self.query.nearest if isinstance(self.query, NearestQuery) else self.query


class QueryBatch(Strict):
    searches: list[QueryRequest] = Field(min_length=1)


class SearchBatch(Strict):
    searches: list[SearchRequest] = Field(min_length=1)


class RecommendRequest(Strict):
    positive: list[PointId] = Field(min_length=1, max_length=64, description="ids whose neighbours to find")
    using: VectorName | None = Field(None, description="the named vector to use (null: the unnamed one)")
    limit: int = Field(10, ge=1, le=10_000)
    params: SearchParams | None = None
    filter: Filter | None = None
    with_payload: bool = Field(False, description="payload in the hits (Qdrant's default: none)")

