"""Typed QINCo results, shared by Client and AsyncClient (Qdrant's own come from qdrant_client.models)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class TrainingJob(BaseModel):
    """A training job in progress: `train` fits a model, `swap_in` encodes with a given one."""
    model_config = ConfigDict(extra="allow")
    id: str
    kind: str  # "train" | "swap_in"
    phase: str  # "queued" | "training" | "encoding" | "swapping"
    progress: float  # 0..1
    eta_seconds: float | None = None
    started: float  # unix seconds
    minutes: float | None = None  # the training budget
    points_encoded: int = 0
    points_total: int | None = None  # None until the worker's first report
    val_mse: float | None = None
    rq_val_mse: float | None = None


class ModelStats(BaseModel):
    """The model serving the collection."""
    model_config = ConfigDict(extra="allow")
    generation: int
    val_mse: float | None = None
    rq_val_mse: float | None = None
    mse_vs_rq: float | None = None
    trained_on: int | None = None
    bytes: int
    nlist: int


class BytesPerPoint(BaseModel):
    model_config = ConfigDict(extra="allow")
    memory: int
    disk: int


class QincoStatus(BaseModel):
    """A collection's training state (the "qinco" block of its info)."""
    model_config = ConfigDict(extra="allow")
    phase: str  # "collecting" | "training" | "encoding" | "ready"
    job: TrainingJob | None = None
    model: ModelStats | None = None
    points_encoded: int  # points served by the QINCo index
    refine_pending: int = 0  # acknowledged with `fast` codes, not yet re-encoded (fast ingest)
    last_swap: float | None = None
    last_error: str | None = None  # why the last job failed
    train_after: int  # 0: only trained on request
    train_minutes: float | None = None  # None for a collection created from a trained model
    keep_originals: bool
    retrain_growth: float = 0  # retrains by itself at this many times the points its model trained on (0: never)
    paused: bool = False  # automatic training off after a cancel, until the next train request
    originals: int  # original vectors on disk
    bytes_per_point: BytesPerPoint


class CollectionInfo(BaseModel):
    """QINCo's fields; Qdrant's (config, payload_schema, ...) are kept as extra attributes.

    A collection still collecting its training points has no model: no bytes_per_vector, nlist, ...
    """
    model_config = ConfigDict(extra="allow")
    name: str
    status: str  # "grey" collecting | "yellow" a job runs or codes are refined | "green" | "red"
    dimension: int
    metric: str
    points_count: int
    bytes_per_vector: int | None = None
    nlist: int | None = None
    encoder: str | None = None
    default_params: dict[str, Any] | None = None
    tuned: bool | None = None
    qinco: QincoStatus | None = None
