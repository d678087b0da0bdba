"""Payload filters: Qdrant's filter language (service/engine/filters.py evaluates it by the fields
and KIND tags of these models)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Union

from pydantic import AfterValidator, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag, model_validator

from .common import MAX_ID, Finite, PointId, Strict, check_unicode

MAX_FILTER_DEPTH = 16
MAX_FILTER_CONDITIONS = 64  # each costs a pass over a field index: bounds a filter's CPU
MAX_FILTER_KEYS = 8  # each may need a field index built
MAX_FILTER_IDS = 100_000  # has_id ids in one filter: UUIDs among them are SQLite look-ups
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
