"""Qdrant's response shapes, built from the engine's results: the envelope, hits, records, update
results, and a collection's info."""

from __future__ import annotations

import time

import orjson
from fastapi.responses import Response

from .schemas import DISTANCES


class JSON(Response):
    """A JSON response serialised by orjson, straight from the result (no jsonable_encoder pass)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def ok(result, started: float, status_code: int = 200) -> JSON:
    """Qdrant's envelope."""
    return JSON({"result": result, "status": "ok", "time": round(time.perf_counter() - started, 6)},
                status_code=status_code)


def update_result(seq: int, count: int | None = None) -> dict:
    """Qdrant's UpdateResult, with how many points the operation touched when known."""
    return {"operation_id": seq, "status": "completed", **({"count": count} if count is not None else {})}


def project(payload: dict | None, selector) -> dict | None:
    """The payload keys a `with_payload` selector asks for: true, a list of keys, {include}, {exclude}."""
    if payload is None or selector is True:
        return payload
    if isinstance(selector, list):
        keep = set(selector)
        return {k: v for k, v in payload.items() if k in keep}
    if selector.include is not None:
        keep = set(selector.include)
        return {k: v for k, v in payload.items() if k in keep}
    drop = set(selector.exclude or ())
    return {k: v for k, v in payload.items() if k not in drop}


def wants_payload(selector) -> bool:
    return selector is not False


def hit_json(hit, with_payload) -> dict:
    """A search hit (Qdrant's ScoredPoint): id, version, score, payload when asked for (even
    null), vector when present.  Points carry no version of their own here: 0."""
    out = {"id": hit.id, "version": 0, "score": hit.score}
    if with_payload is not False:
        out["payload"] = project(hit.payload, with_payload)
    if hit.vector is not None:
        out["vector"] = hit.vector
    return out


def record_json(r: dict, with_payload) -> dict:
    """A stored point (Qdrant's Record)."""
    out = {"id": r["id"], "payload": project(r["payload"], with_payload) if with_payload is not False else None}
    if "vector" in r:
        out["vector"] = r["vector"]
    return out


def collection_info(info: dict) -> dict:
    """Qdrant's collection info (a single segment, shard and replica; its HNSW settings are those
    of the IVF coarse quantizer), then the engine's own figures (Collection.info).  Its vectors'
    config has Qdrant's two forms: one unnamed vector's, or the named vectors' by name."""
    params = {name: {"size": v["dimension"], "distance": DISTANCES[v["metric"]],  # a datatype as Qdrant: if chosen
                     **({"datatype": v["datatype"]} if v["datatype"] not in (None, "float32") else {})}
              for name, v in info["vectors"].items()}
    qdrant = {"optimizer_status": "ok",
              "indexed_vectors_count": sum(v["qinco"]["points_encoded"] for v in info["vectors"].values()),
              "segments_count": 1,
              "config": {"params": {"vectors": params if info["named"] else params[""],
                                    "shard_number": 1, "replication_factor": 1,
                                    "write_consistency_factor": 1, "on_disk_payload": True},
                         "hnsw_config": {"m": 32, "ef_construct": 40, "full_scan_threshold": 0},
                         "optimizer_config": {"deleted_threshold": 0.0, "vacuum_min_vector_number": 0,
                                              "default_segment_number": 1, "flush_interval_sec": 0},
                         "quantization_config": None}}
    return {**qdrant, **info}
