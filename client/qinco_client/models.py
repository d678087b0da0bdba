"""Typed results, shared by Client and AsyncClient."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class CollectionInfo(BaseModel):
    name: str
    status: str
    dimension: int
    metric: str
    points_count: int
    bytes_per_vector: int
    nlist: int
    encoder: str
    default_params: dict[str, Any]
    tuned: bool


class ScoredPoint(BaseModel):
    id: int
    score: float
    payload: dict[str, Any] | None = None
    vector: list[float] | None = None


class Record(BaseModel):
    id: int
    payload: dict[str, Any] | None = None
    vector: list[float] | None = None


class UpdateResult(BaseModel):
    operation_id: int
    status: str
    count: int
