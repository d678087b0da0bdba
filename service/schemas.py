"""Request and response models of the REST API (Qdrant-shaped).

Every model forbids unknown fields and NaN/Inf, so bad input is a 422 with a
message before any work is done.  `score` is the Euclidean distance for `l2`
collections (lower is nearer) and the cosine similarity for `cosine`
collections (higher is nearer).
"""

from __future__ import annotations

import uuid
from enum import Enum
from typing import Annotated, Any, ClassVar, Generic, TypeVar, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag,
                      model_validator)

MAX_ID = 2**62 - 1  # integer point ids; the internal ids above are UUIDs' (service/ids.py)
# Vector components are bounded so that squared distances stay finite in float32 (and bf16).
MAX_ABS = 1e12
MAX_EF_SEARCH = 65_536
MAX_PAYLOAD_DEPTH = 32
MAX_FILTER_DEPTH = 16
MAX_FILTER_CONDITIONS = 64  # each costs a pass over a field index: bounds a filter's CPU
MAX_FILTER_KEYS = 8  # each may need a field index built
MAX_FILTER_IDS = 100_000  # has_id ids in one filter: UUIDs among them are SQLite look-ups
Finite = Annotated[float, Field(allow_inf_nan=False)]
Component = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS, le=MAX_ABS)]
IntId = Annotated[int, Field(ge=0, le=MAX_ID, strict=True, description="a non-negative integer below 2^62")]


def parse_uuid(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ValueError("point ids are non-negative integers or UUIDs (e.g. "
                         "'5c56c793-69f3-4fbf-87e6-c4bf54c28c26')") from None


def parse_path_id(text: str) -> int | str:
    """A point id in a URL: digits are an integer id, anything else must be a UUID."""
    if text.isascii() and text.isdigit() and len(text) != 32:  # 32 digits: a UUID's hex that has no letter
        if int(text) > MAX_ID:
            raise ValueError(f"integer point ids must be at most {MAX_ID}")
        return int(text)
    return parse_uuid(text)


UuidId = Annotated[str, Field(max_length=45, json_schema_extra={"format": "uuid"}), AfterValidator(parse_uuid)]
PointId = Annotated[IntId | UuidId, Field(description="a non-negative integer below 2^62, or a UUID (Qdrant's ids)")]
ResponseId = Annotated[int | str, Field(description="the point's id: an integer, or a UUID")]
CollectionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


def check_unicode(text: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that no UTF-8 response can: refuse them on the way in."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("strings must be valid Unicode (no lone surrogates)") from None
    return text


def check_json_value(value: Any, depth: int = 0) -> None:
    """Payloads (and settings) must read back as JSON: finite numbers, 64-bit integers, bounded nesting."""
    if depth > MAX_PAYLOAD_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_PAYLOAD_DEPTH} levels")
    if isinstance(value, str):
        check_unicode(value)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not -2**63 <= value < 2**63:
            raise ValueError(f"integer {value} does not fit in 64 bits")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k)
            check_json_value(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_json_value(v, depth + 1)
    else:
        raise ValueError(f"values must be JSON, got {type(value).__name__}")


def _valid_payload(payload: dict[str, Any] | None) -> dict[str, Any] | None:
    if payload is not None:
        check_json_value(payload)
    return payload


Payload = Annotated[dict[str, Any] | None, AfterValidator(_valid_payload)]
IgnoredSettings = Annotated[dict[str, Any] | None, AfterValidator(_valid_payload),
                            Field(description="Qdrant's, accepted (finite JSON) and ignored")]
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


MAX_DIMENSION = 8192
DISTANCE_METRICS = {"Euclid": "l2", "Cosine": "cosine"}


class VectorParams(Strict):
    """Qdrant's vector parameters.  QINCo's codes approximate Euclidean distance: Euclid and Cosine
    (normalised vectors) are served, Dot and Manhattan are not."""
    size: int = Field(ge=1, le=MAX_DIMENSION, strict=True)
    distance: str
    on_disk: bool | None = None  # accepted, ignored: originals are on disk, codes in memory
    hnsw_config: IgnoredSettings = None  # accepted, ignored: QINCo's own IVF-HNSW settings apply
    quantization_config: IgnoredSettings = None  # accepted, ignored: every vector is QINCo-quantised
    datatype: str | None = None
    multivector_config: None = None

    @model_validator(mode="after")
    def servable(self):
        if self.distance not in DISTANCE_METRICS:
            raise ValueError(f"distance {self.distance!r} is not supported: QINCo's codes approximate Euclidean "
                             f"distance; use 'Cosine' (normalised vectors: the same ranking as 'Dot' on them) "
                             f"or 'Euclid'")
        if self.datatype not in (None, "float32"):
            raise ValueError(f"datatype {self.datatype!r} is not supported: vectors are float32")
        return self


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


class CreateCollection(Strict):
    """Qdrant's body (`vectors`: size and distance; QINCo's settings under `qinco`): a collection
    that trains its own model.  Or an existing model (`model`) or index (`index`) with `metric`.
    Qdrant's other settings are accepted and ignored."""
    vectors: VectorParams | None = None
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
    sparse_vectors: dict[str, Any] | None = Field(None, max_length=0, description="not supported: only {} or null")
    init_from: None = None
    metadata: IgnoredSettings = None

    @model_validator(mode="before")
    @classmethod
    def named_vectors(cls, data):
        vectors = data.get("vectors") if isinstance(data, dict) else None
        if isinstance(vectors, dict) and "size" not in vectors and vectors and \
                all(isinstance(v, dict) for v in vectors.values()):
            raise ValueError("named vectors are not supported: give one unnamed vector config, "
                             "{\"size\": ..., \"distance\": ...}")
        return data

    @model_validator(mode="after")
    def one_source(self):
        if sum(x is not None for x in (self.vectors, self.model, self.index)) != 1:
            raise ValueError("give exactly one of 'vectors' (size and distance), 'model' or 'index'")
        if self.vectors is not None and self.metric is not None:
            raise ValueError("with 'vectors', the metric is its 'distance' (not 'metric')")
        if self.vectors is None and self.qinco is not None:
            raise ValueError("'qinco' settings are for collections created by 'vectors' (size and distance)")
        return self


class TrainRequest(Strict):
    """Train a new model on the collection's originals, or swap in a model file."""
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


# ---- payload filters (Qdrant's filter language; semantics in service/filters.py) -------------
MatchLiteral = Annotated[StrictStr, Field(max_length=10_000)] | Annotated[StrictInt, Field(ge=-2**63, le=2**63 - 1)] | StrictBool
PayloadKey = Annotated[str, Field(min_length=1, max_length=256, description="a payload field; dots for nested fields"),
                       AfterValidator(check_unicode)]


class MatchValue(Strict):
    KIND: ClassVar[str] = "value"
    value: MatchLiteral


class MatchAny(Strict):
    KIND: ClassVar[str] = "any"
    any: list[Annotated[StrictStr, Field(max_length=10_000)]] | list[Annotated[StrictInt, Field(ge=-2**63, le=2**63 - 1)]]


class MatchExcept(Strict):
    KIND: ClassVar[str] = "except"
    except_: list[Annotated[StrictStr, Field(max_length=10_000)]] | list[Annotated[StrictInt, Field(ge=-2**63, le=2**63 - 1)]] = Field(alias="except")


class MatchText(Strict):
    KIND: ClassVar[str] = "text"
    text: str = Field(min_length=1, max_length=10_000, description="substring of a string value")


class Range(Strict):
    gt: Finite | None = None
    gte: Finite | None = None
    lt: Finite | None = None
    lte: Finite | None = None


class ValuesCount(Strict):
    gt: int | None = Field(None, ge=0, le=2**31)
    gte: int | None = Field(None, ge=0, le=2**31)
    lt: int | None = Field(None, ge=0, le=2**31)
    lte: int | None = Field(None, ge=0, le=2**31)


class FieldCondition(Strict):
    KIND: ClassVar[str] = "field"
    key: PayloadKey
    match: Annotated[Union[Annotated[MatchValue, Tag("value")], Annotated[MatchAny, Tag("any")],
                           Annotated[MatchExcept, Tag("except")], Annotated[MatchText, Tag("text")]],
                     _kind({"value": "value", "any": "any", "except": "except", "text": "text"}, "value")] | None = None
    range: Range | None = None
    values_count: ValuesCount | None = None

    @model_validator(mode="after")
    def one_test(self):
        if sum(x is not None for x in (self.match, self.range, self.values_count)) != 1:
            raise ValueError("a field condition needs exactly one of match, range or values_count")
        return self


class PayloadField(Strict):
    key: PayloadKey


class IsEmptyCondition(Strict):
    KIND: ClassVar[str] = "is_empty"
    is_empty: PayloadField


class IsNullCondition(Strict):
    KIND: ClassVar[str] = "is_null"
    is_null: PayloadField


class HasIdCondition(Strict):
    KIND: ClassVar[str] = "has_id"
    has_id: list[PointId] = Field(max_length=100_000)


def _kind(keys: dict[str, str], default: str | None):
    """A discriminator that picks a union member by the key it holds (focused error messages)."""
    def kind(value):
        if isinstance(value, dict):
            return next((tag for key, tag in keys.items() if key in value), default)
        return getattr(value, "KIND", None)
    return Discriminator(kind)


Condition = Annotated[Union[Annotated[FieldCondition, Tag("field")], Annotated[IsEmptyCondition, Tag("is_empty")],
                            Annotated[IsNullCondition, Tag("is_null")], Annotated[HasIdCondition, Tag("has_id")],
                            Annotated["Filter", Tag("filter")]],
                      _kind({"key": "field", "is_empty": "is_empty", "is_null": "is_null", "has_id": "has_id"}, "filter")]
Conditions = Annotated[list[Condition], Field(max_length=1_000)] | Condition


class MinShould(Strict):
    """At least `min_count` of the conditions (0: every point; more than there are: none)."""
    conditions: Annotated[list[Condition], Field(max_length=1_000)]
    min_count: int = Field(ge=0, le=MAX_ID, strict=True)


class Filter(Strict):
    KIND: ClassVar[str] = "filter"
    must: Conditions | None = None
    should: Conditions | None = None
    must_not: Conditions | None = None
    min_should: MinShould | None = None

    def parts(self) -> list:
        """Every condition directly in this filter (nested filters are conditions)."""
        out = []
        for part in (self.must, self.should, self.must_not, self.min_should and self.min_should.conditions):
            out += part if isinstance(part, list) else [] if part is None else [part]
        return out

    @model_validator(mode="after")
    def bounded(self):
        if filter_depth(self) > MAX_FILTER_DEPTH:
            raise ValueError(f"filters may nest at most {MAX_FILTER_DEPTH} levels")
        conditions, keys = filter_size(self)
        if conditions > MAX_FILTER_CONDITIONS:
            raise ValueError(f"a filter may hold at most {MAX_FILTER_CONDITIONS} conditions, got {conditions}")
        if len(keys) > MAX_FILTER_KEYS:
            raise ValueError(f"a filter may name at most {MAX_FILTER_KEYS} payload keys, got {len(keys)}")
        named = filter_id_count(self)
        if named > MAX_FILTER_IDS:
            raise ValueError(f"a filter's has_id conditions may name at most {MAX_FILTER_IDS} ids in all, got {named}")
        return self


Filter.model_rebuild()


def filter_size(f: Filter) -> tuple[int, set[str]]:
    """How many conditions a filter holds, nested ones included, and the payload keys it names."""
    count, keys = 0, set()
    for c in f.parts():
        if isinstance(c, Filter):
            n, k = filter_size(c)
            count, keys = count + n, keys | k
        else:
            count += 1
            key = getattr(c, "key", None) or getattr(getattr(c, "is_empty", None) or getattr(c, "is_null", None), "key", None)
            if key:
                keys.add(key.replace("[]", ""))
    return count, keys


def filter_id_count(f: Filter) -> int:
    return sum(filter_id_count(c) if isinstance(c, Filter) else len(getattr(c, "has_id", None) or ()) for c in f.parts())


def filter_depth(f: Filter) -> int:
    return 1 + max((filter_depth(c) for c in f.parts() if isinstance(c, Filter)), default=0)


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
    nshort: int | None = Field(None, ge=0, le=100_000, description="candidates re-ranked by the neural decoder (0: none)")
    target_recall: float | None = Field(None, gt=0, le=1)
    hnsw_ef: int | None = Field(None, ge=1, le=MAX_EF_SEARCH, description="Qdrant's name of ef_search")
    exact: bool = Field(False, description="probe every list, re-rank a wide shortlist")
    rescore: bool = Field(False, description="re-rank the final candidates with their original vectors "
                                             "(self-training collections that keep them)")
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


class Point(Strict):
    id: PointId
    vector: Vector
    payload: Payload = None


class PointsBatch(Strict):
    """Qdrant's column form of an upsert."""
    ids: list[PointId] = Field(min_length=1)
    vectors: list[Vector]
    payloads: list[Payload] | None = None

    @model_validator(mode="after")
    def same_lengths(self):
        if len(self.vectors) != len(self.ids) or (self.payloads is not None and len(self.payloads) != len(self.ids)):
            raise ValueError("batch: ids, vectors and payloads must have the same length")
        return self


class UpsertPoints(Strict):
    """`points` (a list of points) or `batch` (columns), as in Qdrant."""
    points: list[Point] | None = Field(None, min_length=1)
    batch: PointsBatch | None = None

    @model_validator(mode="after")
    def points_or_batch(self):
        if (self.points is None) == (self.batch is None):
            raise ValueError("give either 'points' or 'batch'")
        return self

    def columns(self) -> tuple[list[int], list[list[float]], list[dict | None]]:
        if self.batch is not None:
            b = self.batch
            return b.ids, b.vectors, b.payloads or [None] * len(b.ids)
        return [p.id for p in self.points], [p.vector for p in self.points], [p.payload for p in self.points]


class PointSelector(Strict):
    """Qdrant's selector: the ids, or a filter."""
    points: list[PointId] | None = Field(None, min_length=1)
    filter: Filter | None = None

    @model_validator(mode="after")
    def ids_or_filter(self):
        if (self.points is None) == (self.filter is None):
            raise ValueError("give either 'points' (ids) or 'filter'")
        return self


class DeletePoints(PointSelector):
    pass


class CountRequest(Strict):
    filter: Filter | None = None
    exact: bool = True


class FieldSchema(str, Enum):
    keyword = "keyword"
    integer = "integer"
    float = "float"
    bool = "bool"


class CreateFieldIndex(Strict):
    field_name: PayloadKey
    field_schema: FieldSchema


TopKey = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^.\[\]]+$",
                              description="a top-level payload key (nested keys are not supported here)"),
                   AfterValidator(check_unicode)]
KeyList = Annotated[list[TopKey], Field(max_length=1_000)]


class PayloadSelector(Strict):
    include: KeyList | None = None
    exclude: KeyList | None = None


WithPayload = bool | KeyList | PayloadSelector


class SearchRequest(Strict):
    vector: Vector
    limit: int = Field(10, ge=1, le=10_000)
    offset: int = Field(0, ge=0, le=10_000, description="skip this many of the best results")
    score_threshold: Finite | None = Field(None, description="cosine: at least this similarity; l2: at most this distance")
    params: SearchParams | None = None
    filter: Filter | None = None
    with_payload: WithPayload = Field(False, description="payload in the hits (Qdrant's default: none)")
    with_vector: bool = False


class NearestQuery(Strict):
    nearest: Vector | PointId


class QueryRequest(Strict):
    """Qdrant's universal query, for what a single dense vector can do: nearest to a vector,
    or to a stored point (by id); without `query`, the points by ascending id (score 0)."""
    query: Vector | NearestQuery | PointId | None = None
    filter: Filter | None = None
    params: SearchParams | None = None
    limit: int = Field(10, ge=1, le=10_000)
    offset: int = Field(0, ge=0, le=10_000)
    score_threshold: Finite | None = None
    with_payload: WithPayload = False
    with_vector: bool = False
    using: str | None = Field(None, description="named vectors are not supported: null only")
    prefetch: Any = Field(None, description="not supported: null only")
    lookup_from: Any = Field(None, description="not supported: null only")

    @model_validator(mode="after")
    def single_dense_vector(self):
        if self.using is not None:
            raise ValueError("named vectors are not supported: a collection holds one dense vector per point")
        if self.prefetch is not None or self.lookup_from is not None:
            raise ValueError("prefetch and lookup_from are not supported")
        return self


class QueryBatch(Strict):
    searches: list[QueryRequest] = Field(min_length=1)


class RetrieveRequest(Strict):
    ids: list[PointId]
    with_payload: WithPayload = True
    with_vector: bool = False


class ScrollRequest(Strict):
    filter: Filter | None = None
    limit: int = Field(10, ge=1, le=10_000)
    offset: PointId | None = Field(None, description="the first id of the page (next_page_offset of the last one)")
    with_payload: WithPayload = True
    with_vector: bool = False


class SetPayload(PointSelector):
    payload: Annotated[dict[str, Any], AfterValidator(_valid_payload)]
    key: str | None = Field(None, description="not supported: null only")

    @model_validator(mode="after")
    def no_key(self):
        if self.key is not None:
            raise ValueError("setting a nested key ('key') is not supported")
        return self


class DeletePayload(PointSelector):
    keys: Annotated[list[TopKey], Field(min_length=1, max_length=1_000)]


class SearchBatch(Strict):
    searches: list[SearchRequest] = Field(min_length=1)


class RecommendRequest(Strict):
    positive: list[PointId] = Field(min_length=1, max_length=64, description="ids whose neighbours to find")
    limit: int = Field(10, ge=1, le=10_000)
    params: SearchParams | None = None
    filter: Filter | None = None
    with_payload: bool = Field(False, description="payload in the hits (Qdrant's default: none)")


# ---- responses (Qdrant's shapes; they document the API, routes send them as built) -----------
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
    vector: list[float] | None = None


class Record(BaseModel):
    id: ResponseId
    payload: dict[str, Any] | None = None
    vector: list[float] | None = None


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
    originals: int = Field(description="original vectors kept on disk")
    bytes_per_point: dict[str, int] = Field(description="memory (index and scan copy, estimated) and disk "
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
