"""Request and response models of the REST API (Qdrant-shaped).

Every model forbids unknown fields and NaN/Inf, so bad input is a 422 with a
message before any work is done.  `score` is the squared L2 distance for `l2`
collections (lower is nearer) and the cosine similarity for `cosine`
collections (higher is nearer).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ID = 2**63 - 1
Finite = Annotated[float, Field(allow_inf_nan=False)]
PointId = Annotated[int, Field(ge=0, le=MAX_ID, strict=True, description="a non-negative 64-bit integer")]
CollectionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Metric(str, Enum):
    l2 = "l2"
    cosine = "cosine"


class Encoder(str, Enum):
    fast = "fast"
    balanced = "balanced"
    quality = "quality"
    greedy = "greedy"


class CreateCollection(Strict):
    model: str | None = Field(None, description="a trained IVF model file, inside the data directory")
    index: str | None = Field(None, description="or a built index directory, inside the data directory")
    metric: Metric = Metric.l2
    encoder: Encoder = Field(Encoder.balanced, description="QINCo encoder used for upserts")

    @model_validator(mode="after")
    def one_source(self):
        if (self.model is None) == (self.index is None):
            raise ValueError("give exactly one of 'model' or 'index'")
        return self


class SearchParams(Strict):
    nprobe: int | None = Field(None, ge=1)
    ef_search: int | None = Field(None, ge=1)
    nshort: int | None = Field(None, ge=0, le=100_000, description="candidates re-ranked by the neural decoder (0: none)")
    target_recall: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def raw_or_target(self):
        raw = any(v is not None for v in (self.nprobe, self.ef_search, self.nshort))
        if raw and self.target_recall is not None:
            raise ValueError("give either nprobe/ef_search/nshort or target_recall, not both")
        return self


class Point(Strict):
    id: PointId
    vector: list[Finite] = Field(min_length=1)
    payload: dict[str, Any] | None = None


class UpsertPoints(Strict):
    points: list[Point] = Field(min_length=1)


class DeletePoints(Strict):
    points: list[PointId] = Field(min_length=1)


class SearchRequest(Strict):
    vector: list[Finite] = Field(min_length=1)
    limit: int = Field(10, ge=1)
    params: SearchParams | None = None
    with_payload: bool = True
    with_vector: bool = False


class SearchBatch(Strict):
    searches: list[SearchRequest] = Field(min_length=1)


class RecommendRequest(Strict):
    positive: list[PointId] = Field(min_length=1, max_length=64, description="ids whose neighbours to find")
    limit: int = Field(10, ge=1)
    params: SearchParams | None = None
    with_payload: bool = True
