"""Collections: create (by size and distance, or from a model or index), train, payload indexes."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from ...engine.space import MAX_SPACES
from ...training.policy import MIN_RETRAIN_GROWTH, check_growth
from .common import MAX_DIMENSION, METRICS, Encoder, IgnoredSettings, Metric, Strict, VectorName
from .filters import PayloadKey


class VectorParams(Strict):
    """Qdrant's vector parameters.  QINCo's codes approximate Euclidean distance: Euclid and Cosine
    (normalised vectors) are served, Dot and Manhattan are not."""
    size: int = Field(ge=1, le=MAX_DIMENSION, strict=True)
    distance: str
    on_disk: bool | None = None  # accepted, ignored: originals are on disk, codes in memory
    hnsw_config: IgnoredSettings = None  # accepted, ignored: QINCo's own IVF-HNSW settings apply
    quantization_config: IgnoredSettings = None  # accepted, ignored: every vector is QINCo-quantised
    datatype: str | None = Field(None, description="how the originals are kept on disk: float32 (the default) or "
                                                   "float16 (half the disk, for rescore and retraining)")
    multivector_config: None = None

    @model_validator(mode="after")
    def servable(self):
        if self.distance not in METRICS:
            raise ValueError(f"distance {self.distance!r} is not supported: QINCo's codes approximate Euclidean "
                             f"distance; use 'Cosine' (normalised vectors: the same ranking as 'Dot' on them) "
                             f"or 'Euclid'")
        if self.datatype not in (None, "float32", "float16"):
            raise ValueError(f"datatype {self.datatype!r} is not supported: originals are kept as float32 or "
                             f"float16 (codes are QINCo's)")
        return self


def vectors_form(value) -> str:
    """Which of Qdrant's two forms a `vectors` config is, so that errors speak of that one only."""
    return "one" if isinstance(value, dict) and ("size" in value or "distance" in value) else "named"


VectorsConfig = Annotated[
    Annotated[VectorParams, Tag("one")]
    | Annotated[dict[VectorName, VectorParams], Field(min_length=1, max_length=MAX_SPACES), Tag("named")],
    Discriminator(vectors_form)]


class QincoSettings(Strict):
    """A self-training collection's settings; the server's QINCO_* settings give the defaults."""
    bytes: int | None = Field(None, ge=1, le=64, strict=True, description="code bytes per vector")
    train_after: int | None = Field(None, ge=0, le=1_000_000_000, strict=True,
                                    description="train automatically once this many points are stored (0: only "
                                                "on POST /collections/{name}/train)")
    train_minutes: float | None = Field(None, gt=0, le=24 * 60, description="training budget")
    keep_originals: bool | None = Field(None, description="keep original vectors after training "
                                                          "(rescore, retraining); false: codes only")
    nlist: int | None = Field(None, ge=1, le=65_536, strict=True, description="IVF lists (default: from the count)")
    retrain_growth: float | None = Field(None, ge=0, le=1_000_000, strict=True,
                                         description="retrain by itself once a job would sample this many times the "
                                                     f"points the model trained on: 0 (never) or {MIN_RETRAIN_GROWTH} "
                                                     "and more")

    @field_validator("retrain_growth")
    @classmethod
    def growth_or_never(cls, v):
        return check_growth(v)


class CreateCollection(Strict):
    """Qdrant's body (`vectors`: size and distance; QINCo's settings under `qinco`): a collection
    that trains its own model.  Or an existing model (`model`) or index (`index`) with `metric`.
    Qdrant's other settings are accepted and ignored."""
    vectors: VectorsConfig | None = Field(None, description="one unnamed vector's size and distance, or Qdrant's "
                                                            "named vectors: {name: {size, distance}}, each trained "
                                                            "on its own")
    qinco: QincoSettings | None = None
    model: str | None = Field(None, min_length=1, max_length=4096,
                              description="a trained IVF model file, inside the data directory")
    index: str | None = Field(None, min_length=1, max_length=4096,
                              description="or a built index directory, inside the data directory")
    metric: Metric | None = None
    encoder: Encoder = Field(Encoder.balanced, description="QINCo encoder of the stored codes (with fast ingest, "
                             "upserts are acknowledged with `fast` codes and re-encoded with this one in the background)")
    # Qdrant's, accepted and ignored (one shard, one replica, no WAL of its own to tune):
    shard_number: int | None = Field(None, ge=1, le=1)
    sharding_method: str | None = None
    replication_factor: int | None = Field(None, ge=1, le=1)
    write_consistency_factor: int | None = Field(None, ge=1, le=1)
    on_disk_payload: bool | None = None
    hnsw_config: IgnoredSettings = None
    wal_config: IgnoredSettings = None
    optimizers_config: IgnoredSettings = None
    quantization_config: IgnoredSettings = None
    strict_mode_config: IgnoredSettings = None
    sparse_vectors: dict[str, Any] | None = Field(None, description="not supported: only {} or null")
    init_from: None = None
    metadata: IgnoredSettings = None

    @model_validator(mode="after")
    def one_source(self):
        if self.sparse_vectors:
            raise ValueError("sparse vectors are not supported: give dense vectors only (named ones included), "
                             "and no hybrid search")
        if sum(x is not None for x in (self.vectors, self.model, self.index)) != 1:
            raise ValueError("give exactly one of 'vectors' (size and distance), 'model' or 'index'")
        if self.vectors is not None and self.metric is not None:
            raise ValueError("with 'vectors', the metric is its 'distance' (not 'metric')")
        if self.vectors is None and self.qinco is not None:
            raise ValueError("'qinco' settings are for collections created by 'vectors' (size and distance)")
        return self


class TrainRequest(Strict):
    """Train a new model on the collection's originals, or swap in a model file."""
    vector: VectorName | None = Field(None, description="the named vector to train (null: the unnamed one)")
    minutes: float | None = Field(None, gt=0, le=24 * 60, description="training budget")
    bytes: int | None = Field(None, ge=1, le=64, strict=True, description="code bytes per vector")
    nlist: int | None = Field(None, ge=1, le=65_536, strict=True, description="IVF lists (default: from the count)")
    model: str | None = Field(None, min_length=1, max_length=4096,
                              description="a trained IVF model file inside the data directory, encoded with "
                                          "and swapped in (no training)")

    @model_validator(mode="after")
    def model_or_training(self):
        if self.model is not None and any(v is not None for v in (self.minutes, self.bytes, self.nlist)):
            raise ValueError("give 'model' alone, or training settings (minutes, bytes, nlist)")
        return self


class FieldSchema(str, Enum):
    keyword = "keyword"
    integer = "integer"
    float = "float"
    bool = "bool"


class CreateFieldIndex(Strict):
    field_name: PayloadKey
    field_schema: FieldSchema
