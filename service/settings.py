"""Service configuration: QINCO_* environment variables, or a .env-style settings file."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QINCO_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("data"), description="collections, models and snapshots live here")
    host: str = "127.0.0.1"
    port: int = Field(6343, ge=1, le=65535)
    api_key: str | None = Field(None, description="when set, every route but the health checks needs it")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_batch: int = Field(10_000, ge=1, description="points per upsert or delete, queries per batch search")
    max_limit: int = Field(1_000, ge=1, description="largest `limit` of a search")
    max_search_candidates: int = Field(2_000_000, ge=1, le=50_000_000,
                                       description="queries x max(limit, nshort) in one search request")
    threads: int = Field(0, ge=0, description="CPU threads per request for torch, faiss and numba (0: all cores)")
    snapshot_every: int = Field(50_000, ge=1, description="write a snapshot after this many changed points")
    search_batching: bool = Field(True, description="run concurrent lone searches on a collection as one batch")
    fast_ingest: bool = Field(True, description="acknowledge upserts with `fast` codes and re-encode them with the "
                              "collection's encoder in the background (off: upserts wait for the better codes)")
    access_log: bool = Field(False, description="log every request (costs time per request; /metrics counts them)")
    # Self-training collections (created by size and distance): defaults of their `qinco` settings
    train_after: int = Field(20_000, ge=0, le=1_000_000_000,
                             description="points before a new collection trains its model (0: only on request)")
    train_minutes: float = Field(30.0, gt=0, le=24 * 60, description="training budget of a collection's model")
    train_bytes: int = Field(8, ge=1, le=64, description="code bytes per vector of a trained model")
    keep_originals: bool = Field(True, description="keep original vectors after training (rescore, retraining)")
    train_threads: int = Field(0, ge=0, le=1024, description="CPU threads of a training job (0: half the cores)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d{1,2})?)$",
                        description="where training jobs train and encode: auto (a GPU where torch sees one), "
                                    "cpu, cuda or cuda:N")
    train_sample: int = Field(100_000, ge=1_000, le=10_000_000,
                              description="originals a job trains on at most (a random sample)")
    demo: bool = Field(True, description="create the demo collection on first start when none exists")
    demo_points: int = Field(100_000, ge=100, description="GloVe words in the demo collection")

    def training_threads(self) -> int:
        return self.train_threads or max(1, (os.cpu_count() or 2) // 2)
