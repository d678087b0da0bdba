"""Request and response models of the REST API (Qdrant-shaped).

Every model forbids unknown fields and NaN/Inf, so bad input is a 422 with a
message before any work is done.  `score` is the squared L2 distance for `l2`
collections (lower is nearer) and the cosine similarity for `cosine`
collections (higher is nearer).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_ID = 2**63 - 1
# Vector components are bounded so that squared distances stay finite in float32 (and bf16).
MAX_ABS = 1e12
MAX_EF_SEARCH = 65_536
MAX_PAYLOAD_DEPTH = 32
Component = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS, le=MAX_ABS)]
PointId = Annotated[int, Field(ge=0, le=MAX_ID, strict=True, description="a non-negative 64-bit integer")]
CollectionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


def check_json_value(value: Any, depth: int = 0) -> None:
    """Payload values must read back as JSON: finite numbers, 64-bit integers, bounded nesting."""
    if depth > MAX_PAYLOAD_DEPTH:
        raise ValueError(f"payload nested deeper than {MAX_PAYLOAD_DEPTH} levels")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not -2**63 <= value < 2**63:
            raise ValueError(f"payload integer {value} does not fit in 64 bits")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("payload numbers must be finite (no NaN or Infinity)")
    elif isinstance(value, dict):
        for v in value.values():
            check_json_value(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_json_value(v, depth + 1)
    else:
        raise ValueError(f"payload values must be JSON, got {type(value).__name__}")


def _valid_payload(payload: dict[str, Any] | None) -> dict[str, Any] | None:
    if payload is not None:
        check_json_value(payload)
    return payload


Payload = Annotated[dict[str, Any] | None, AfterValidator(_valid_payload)]
Vector = Annotated[list[Component], Field(min_length=1, description=f"finite numbers, |x| <= {MAX_ABS:g}")]


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
    nprobe: int | None = Field(None, ge=1, le=1 << 20, description="lists probed (at most nlist)")
    ef_search: int | None = Field(None, ge=1, le=MAX_EF_SEARCH)
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
    vector: Vector
    payload: Payload = None


class UpsertPoints(Strict):
    points: list[Point] = Field(min_length=1)


class DeletePoints(Strict):
    points: list[PointId] = Field(min_length=1)


class SearchRequest(Strict):
    vector: Vector
    limit: int = Field(10, ge=1, le=10_000)
    params: SearchParams | None = None
    with_payload: bool = True
    with_vector: bool = False


class SearchBatch(Strict):
    searches: list[SearchRequest] = Field(min_length=1)


class RecommendRequest(Strict):
    positive: list[PointId] = Field(min_length=1, max_length=64, description="ids whose neighbours to find")
    limit: int = Field(10, ge=1, le=10_000)
    params: SearchParams | None = None
    with_payload: bool = True
