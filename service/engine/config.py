"""How the engine runs its collections: one pydantic model, every default said once.

service/settings.py reads these fields from QINCO_* variables (Settings inherits them); tests and
benches build one directly, or pass overrides to `Store(data_dir, **overrides)`.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import BadRequest
from ..training.policy import MIN_PER_LIST, MIN_RETRAIN_GROWTH, check_growth, min_points


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as a container's cpuset sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CollectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threads: int = Field(0, ge=0, description="CPU threads per request for torch, faiss and numba (0: all cores)")
    snapshot_every: int = Field(50_000, ge=1, description="write a snapshot after this many changed points")
    fast_ingest: bool = Field(True, description="acknowledge upserts with `fast` codes and re-encode them with the "
                              "collection's encoder in the background (off: upserts wait for the better codes)")
    max_limit: int = Field(1_000, ge=1, description="largest `limit` of a search")
    max_search_candidates: int = Field(2_000_000, ge=1, le=50_000_000,
                                       description="queries x max(limit, nshort) in one search request")
    search_batching: bool = Field(True, description="run concurrent lone searches on a collection as one batch")
    train_threads: int = Field(0, ge=0, le=1024, description="CPU threads of a training job (0: half the cores)")
    encode_threads: int = Field(0, ge=0, le=1024,
                                description="CPU threads of background encoding, at nice 10: a job's encoding of every "
                                            "point and the re-encoding of fast-ingested points (0: all cores)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d{1,2})?)$",
                        description="where training jobs train and encode: auto (a GPU where torch sees one), "
                                    "cpu, cuda or cuda:N")
    train_sample: int = Field(100_000, ge=1_000, le=10_000_000,
                              description="originals a job trains on at most (a random sample)")
    # Self-training collections (created by size and distance): defaults of their `qinco` settings
    train_after: int = Field(20_000, ge=0, le=1_000_000_000,
                             description="points before a new collection trains its model (0: only on request)")
    train_minutes: float = Field(30.0, gt=0, le=24 * 60, description="training budget of a collection's model")
    train_bytes: int = Field(8, ge=1, le=64, description="code bytes per vector of a trained model")
    keep_originals: bool = Field(True, description="keep original vectors after training (rescore, retraining)")
    retrain_growth: float = Field(0.0, ge=0, le=1_000_000,
                                  description="retrain once a job would sample this many times the points the "
                                              f"model trained on: more data, more IVF lists (0: never by itself; "
                                              f"else {MIN_RETRAIN_GROWTH} and more)")

    _growth = field_validator("retrain_growth")(check_growth)

    @property
    def training_threads(self) -> int:
        """train_threads, 0 resolved: half the cores."""
        return self.train_threads or max(1, usable_cores() // 2)

    @property
    def encoding_threads(self) -> int:
        """encode_threads, 0 resolved: all cores.  Encoding every point is a job's longest phase at
        scale, and its priority already lets searches and writes go first."""
        return self.encode_threads or usable_cores()

    def self_training(self, given: dict | None) -> dict:
        """A new self-training collection's `qinco` settings: those given, these defaults for the rest.
        BadRequest when it would train automatically on too few points."""
        q = {"bytes": self.train_bytes, "train_after": self.train_after, "train_minutes": self.train_minutes,
             "keep_originals": self.keep_originals, "nlist": None, "retrain_growth": self.retrain_growth}
        q.update({k: v for k, v in (given or {}).items() if v is not None})
        need = min_points(q["nlist"])
        if q["train_after"] and q["train_after"] < need:
            raise BadRequest(f"train_after {q['train_after']} is too small: a model needs at least {need} points"
                             + (f" (nlist {q['nlist']} x {MIN_PER_LIST} per list)" if q["nlist"] else ""))
        return q
