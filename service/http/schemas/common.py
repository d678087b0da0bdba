"""The request models' building blocks: ids, vectors, payloads, strictness, Qdrant's names.

Every model forbids unknown fields and NaN/Inf, so bad input is a 422 with a message before any
work is done.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from ...engine.ids import MAX_INT_ID as MAX_ID, parse_uuid

# Vector components are bounded so that squared distances stay finite in float32 (and bf16).
MAX_ABS = 1e12
MAX_EF_SEARCH = 65_536
MAX_PAYLOAD_DEPTH = 32
Finite = Annotated[float, Field(allow_inf_nan=False)]
Component = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS, le=MAX_ABS)]
IntId = Annotated[int, Field(ge=0, le=MAX_ID, strict=True, description="a non-negative integer below 2^62")]


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


def refuse_sparse(value: Any) -> Any:
    """Sparse vectors ({"indices", "values"}) get their own message, not a union's errors."""
    if isinstance(value, dict) and ("indices" in value or "values" in value):
        raise ValueError("sparse vectors are not supported: every vector is dense (a list of numbers); "
                         "named dense vectors are")
    return value


VectorName = Annotated[str, Field(max_length=256, description="a named vector's name (\"\": the unnamed one)"),
                       AfterValidator(check_unicode)]
DenseVector = Annotated[Vector, BeforeValidator(refuse_sparse)]
NamedVectors = Annotated[dict[VectorName, DenseVector], Field(max_length=16)]
def list_or_dict(value: Any) -> str:
    """Which form of a union of a list and an object a value takes: errors then speak of it alone."""
    return "object" if isinstance(value, dict) else "list"


VectorInput = Annotated[Annotated[Vector, Tag("list")] | Annotated[NamedVectors, Tag("object")],
                        Discriminator(list_or_dict), BeforeValidator(refuse_sparse),
                        Field(description="a vector, or vectors by name (Qdrant's named vectors)")]
WithVector = Annotated[bool | Annotated[list[VectorName], Field(max_length=16)],
                      Field(description="true: every vector; or the names of those wanted")]


def by_name(vector: list | dict) -> dict:
    """A point's vectors by name: a plain vector is the unnamed one ("")."""
    return vector if isinstance(vector, dict) else {"": vector}


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
DISTANCES = {"l2": "Euclid", "cosine": "Cosine"}  # Qdrant's names of the metrics
METRICS = {name: metric for metric, name in DISTANCES.items()}


TopKey = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^.\[\]]+$",
                              description="a top-level payload key (nested keys are not supported here)"),
                   AfterValidator(check_unicode)]
KeyList = Annotated[list[TopKey], Field(max_length=1_000)]


class PayloadSelector(Strict):
    include: KeyList | None = None
    exclude: KeyList | None = None


WithPayload = bool | KeyList | PayloadSelector
