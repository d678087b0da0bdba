"""Points: upsert, delete, count, retrieve, scroll, payload operations."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator

from .common import (DenseVector, Payload, PointId, Strict, TopKey, VectorInput, VectorName, WithPayload, WithVector,
                     _valid_payload, by_name)
from .filters import Filter


class Point(Strict):
    id: PointId
    vector: VectorInput
    payload: Payload = None


class PointsBatch(Strict):
    """Qdrant's column form of an upsert: `vectors` a list of vectors, or lists by name."""
    ids: list[PointId] = Field(min_length=1)
    vectors: list[DenseVector] | Annotated[dict[VectorName, list[DenseVector]], Field(max_length=16)]
    payloads: list[Payload] | None = None

    @model_validator(mode="after")
    def same_lengths(self):
        columns = self.vectors.values() if isinstance(self.vectors, dict) else [self.vectors]
        if any(len(v) != len(self.ids) for v in columns) or \
                (self.payloads is not None and len(self.payloads) != len(self.ids)):
            raise ValueError("batch: ids, vectors (of each name) and payloads must have the same length")
        return self

    def vectors_by_name(self) -> list[dict]:
        if isinstance(self.vectors, list):
            return [{"": v} for v in self.vectors]
        return [{name: column[r] for name, column in self.vectors.items()} for r in range(len(self.ids))]


class UpsertPoints(Strict):
    """`points` (a list of points) or `batch` (columns), as in Qdrant."""
    points: list[Point] | None = Field(None, min_length=1)
    batch: PointsBatch | None = None

    @model_validator(mode="after")
    def points_or_batch(self):
        if (self.points is None) == (self.batch is None):
            raise ValueError("give either 'points' or 'batch'")
        return self

    def columns(self) -> tuple[list[int], list[dict], list[dict | None]]:
        """ids, each point's vectors by name, payloads."""
        if self.batch is not None:
            b = self.batch
            return b.ids, b.vectors_by_name(), b.payloads or [None] * len(b.ids)
        return [p.id for p in self.points], [by_name(p.vector) for p in self.points], [p.payload for p in self.points]


class PointVectors(Strict):
    id: PointId
    vector: VectorInput


class UpdateVectors(Strict):
    """Qdrant's update_vectors: set these vectors of stored points; the others stay."""
    points: list[PointVectors] = Field(min_length=1)


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


class DeleteVectors(PointSelector):
    """Qdrant's delete_vectors: remove the named vectors of the points given by ids or a filter."""
    vector: list[VectorName] = Field(min_length=1, max_length=16, description="names of the vectors to delete")


class CountRequest(Strict):
    filter: Filter | None = None
    exact: bool = True


class RetrieveRequest(Strict):
    ids: list[PointId]
    with_payload: WithPayload = True
    with_vector: WithVector = False


class ScrollRequest(Strict):
    filter: Filter | None = None
    limit: int = Field(10, ge=1, le=10_000)
    offset: PointId | None = Field(None, description="the first id of the page (next_page_offset of the last one)")
    with_payload: WithPayload = True
    with_vector: WithVector = False


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

