"""Collections: create, list, info, exists, delete; training; payload indexes."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query

from ...engine.collection import Collection
from ...errors import Conflict
from .. import schemas
from ..deps import JsonRoute, Service, collection, ready
from ..responses import collection_info, ok, update_result

router = APIRouter(route_class=JsonRoute, tags=["collections"], responses=schemas.ERROR_RESPONSES)


@router.get("/collections", response_model=schemas.Envelope[schemas.CollectionsList])
def list_collections(svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    return ok({"collections": [{"name": n} for n in svc.store.names()]}, t0)


@router.put("/collections/{name}", response_model=schemas.Envelope[bool])
def create_collection(name: schemas.CollectionName, body: schemas.CreateCollection, svc: Service = Depends(ready)):
    """By Qdrant's `vectors` (size, distance): the collection trains its own model from the points
    it receives.  Or from a trained model file or index directory.  Answers `true`, as Qdrant."""
    t0 = time.perf_counter()
    store = svc.store
    if isinstance(body.vectors, dict):  # Qdrant's named vectors: a vector space each
        given = body.qinco.model_dump(exclude_none=True) if body.qinco else {}
        named = {n: {"size": v.size, "metric": schemas.METRICS[v.distance], "datatype": v.datatype or "float32"}
                 for n, v in body.vectors.items()}
        store.create(name, None, body.encoder.value, qinco=given, named=named)
    elif body.vectors is not None:
        given = body.qinco.model_dump(exclude_none=True) if body.qinco else {}
        store.create(name, schemas.METRICS[body.vectors.distance], body.encoder.value, size=body.vectors.size,
                     qinco=given, datatype=body.vectors.datatype or "float32")
    else:
        source = store.resolve(body.index if body.model is None else body.model)
        store.create(name, (body.metric or schemas.Metric.l2).value, body.encoder.value, source, body.index is not None)
    return ok(True, t0)


@router.post("/collections/{name}/train", status_code=202, response_model=schemas.Envelope[schemas.QincoStatus])
def train(body: schemas.TrainRequest | None = None, c: Collection = Depends(collection),
          svc: Service = Depends(ready)):
    """Train a new model on the collection's original vectors (or swap in `model`), encode every
    point and switch to it, in the background: searches and writes go on."""
    t0 = time.perf_counter()
    body = body or schemas.TrainRequest()
    if body.model is not None:
        status = c.start_training(model_source=svc.store.resolve(body.model), using=body.vector)
    else:
        status = c.start_training({"train_minutes": body.minutes, "bytes": body.bytes, "nlist": body.nlist},
                                  using=body.vector)
    return ok(status, t0, 202)


@router.delete("/collections/{name}/train", response_model=schemas.Envelope[bool])
def cancel_training(vector: str | None = Query(None, max_length=256, description="the named vector's job"),
                    c: Collection = Depends(collection)):
    """Stop the training job; the model that served before keeps serving."""
    t0 = time.perf_counter()
    if not c.cancel_training(vector):
        raise Conflict(f"the job of collection {c.name!r} finished before it could be cancelled")
    return ok(True, t0)


@router.get("/collections/{name}/exists", response_model=schemas.Envelope[schemas.Exists])
async def collection_exists(name: str, svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    return ok({"exists": svc.store.exists(name)}, t0)


@router.get("/collections/{name}", response_model=schemas.Envelope[schemas.CollectionInfo])
def get_collection(name: str, svc: Service = Depends(ready)):
    """A collection that failed to open answers with status "red" and the reason."""
    t0 = time.perf_counter()
    reason = svc.store.failed.get(name)
    if reason is not None:
        return ok({"name": name, "status": "red", "error": reason}, t0)
    return ok(collection_info(svc.store.get(name).info()), t0)


@router.delete("/collections/{name}", response_model=schemas.Envelope[bool])
def delete_collection(name: str, svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    svc.store.delete(name)
    svc.metrics.forget(name)
    return ok(True, t0)


@router.put("/collections/{name}/index", response_model=schemas.Envelope[schemas.UpdateResult])
def create_field_index(body: schemas.CreateFieldIndex, c: Collection = Depends(collection)):
    """A payload index: filters on the field never read payload JSON (built now, kept up to date)."""
    t0 = time.perf_counter()
    return ok(update_result(c.create_field_index(body.field_name, body.field_schema.value)), t0)


@router.delete("/collections/{name}/index/{field_name}", response_model=schemas.Envelope[schemas.UpdateResult])
def delete_field_index(field_name: schemas.PayloadKey, c: Collection = Depends(collection)):
    t0 = time.perf_counter()
    return ok(update_result(c.delete_field_index(field_name)), t0)
