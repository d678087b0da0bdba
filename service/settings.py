"""Service configuration: QINCO_* environment variables, or a .env-style settings file.

The engine's fields (threads, snapshots, fast ingest, search limits, training) are
CollectionConfig's, inherited with their defaults: each default is said once, there.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .engine.config import CollectionConfig


class Settings(BaseSettings, CollectionConfig):
    model_config = SettingsConfigDict(env_prefix="QINCO_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("data"), description="collections, models and snapshots live here")
    host: str = "127.0.0.1"
    port: int = Field(6343, ge=1, le=65535)
    api_key: str | None = Field(None, description="when set, every route but the health checks needs it")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_batch: int = Field(10_000, ge=1, description="points per upsert or delete, queries per batch search")
    access_log: bool = Field(False, description="log every request (costs time per request; /metrics counts them)")
    demo: bool = Field(True, description="create the demo collection on first start when none exists")
    demo_points: int = Field(100_000, ge=100, description="GloVe words in the demo collection")

    def collection_config(self) -> CollectionConfig:
        """The engine's part of these settings."""
        return CollectionConfig(**self.model_dump(include=set(CollectionConfig.model_fields)))
