"""Responses: Qdrant's shapes.  They document the API; routes send them as built
(service/http/responses.py)."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .common import ResponseId

T = TypeVar("T")


class Envelope(BaseModel, Generic[T]):
    result: T
    status: str = "ok"
    time: float


class ErrorStatus(BaseModel):
    error: str


class ErrorEnvelope(BaseModel):
    status: ErrorStatus
    time: float


class ScoredPoint(BaseModel):
    id: ResponseId
    version: int
    score: float
    payload: dict[str, Any] | None = None
    vector: list[float] | dict[str, list[float]] | None = None


class Record(BaseModel):
    id: ResponseId
    payload: dict[str, Any] | None = None
    vector: list[float] | dict[str, list[float]] | None = None


class UpdateResult(BaseModel):
    operation_id: int
    status: str
    count: int | None = Field(None, description="points the operation touched (QINCo's addition)")


class CountResult(BaseModel):
    count: int


class CollectionDescription(BaseModel):
    name: str


class CollectionsList(BaseModel):
    collections: list[CollectionDescription]


class Exists(BaseModel):
    exists: bool


class QueryResponse(BaseModel):
    points: list[ScoredPoint]


class ScrollResult(BaseModel):
    points: list[Record]
    next_page_offset: ResponseId | None = None


class TrainingJobStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    kind: str = Field(description="train, or swap_in (a given model file)")
    phase: str = Field(description="queued, training, encoding or swapping")
    progress: float = Field(description="of the current phase, 0 to 1")
    eta_seconds: float | None = None
    started: float = Field(description="Unix time")
    minutes: float | None = Field(None, description="training budget")
    points_encoded: int = 0
    points_total: int | None = None
    val_mse: float | None = None
    rq_val_mse: float | None = None


class ModelStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    generation: int = Field(description="0: the model the collection was created with; +1 per swap")
    val_mse: float | None = Field(None, description="validation MSE of the trained model")
    rq_val_mse: float | None = Field(None, description="that of the faiss RQ it started from")
    mse_vs_rq: float | None = None
    trained_on: int | None = None
    bytes: int
    nlist: int


class QincoStatus(BaseModel):
    """Where a collection is: collecting (exact search, no model yet), training, encoding, ready."""
    model_config = ConfigDict(extra="allow")
    phase: str
    job: TrainingJobStatus | None = None
    model: ModelStatus | None = None
    points_encoded: int
    refine_pending: int = Field(0, description="points acknowledged with `fast` codes, not yet re-encoded with the "
                                               "collection's encoder (fast ingest)")
    last_swap: float | None = Field(None, description="Unix time of the last model swap")
    last_error: str | None = Field(None, description="why the last job failed")
    train_after: int
    train_minutes: float | None = None
    keep_originals: bool
    retrain_growth: float = Field(0, description="retrains by itself once a job would sample this many times the "
                                                 "points its model trained on (0: never)")
    paused: bool = Field(False, description="automatic training is off after a cancel, until the next train request")
    originals: int = Field(description="original vectors kept on disk")
    bytes_per_point: dict[str, int] = Field(description="memory (per vector in the index: its code and id; while collecting, its original) and disk "
                                                        "(SQLite, measured)")


class CollectionInfo(BaseModel):
    """Qdrant's collection info, then QINCo's own fields; a collection that failed to open has
    only name, status ("red") and error."""
    model_config = ConfigDict(extra="allow")
    status: str
    name: str
    points_count: int | None = None
    config: dict[str, Any] | None = None
    payload_schema: dict[str, Any] | None = None
    qinco: QincoStatus | None = None
    error: str | None = None


ERROR_RESPONSES = {code: {"model": ErrorEnvelope} for code in (400, 401, 404, 409, 413, 422, 503)}
