"""Collections: create, list, info, exists, delete; payload indexes."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from .. import schemas
from ..deps import ApiError, JsonRoute, Service, collection, ok, ready, update_result
from ..settings import Settings
from ..store import Collection
from ..worker import MIN_PER_LIST, min_points

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
    if body.vectors is not None:
        svc.call(svc.store.create, name, schemas.DISTANCE_METRICS[body.vectors.distance], body.encoder.value,
                 size=body.vectors.size, qinco=qinco_settings(body.qinco, svc.settings))
    else:
        source = svc.call(svc.store.resolve, body.index if body.model is None else body.model)
        metric = (body.metric or schemas.Metric.l2).value
        svc.call(svc.store.create, name, metric, body.encoder.value, source, body.index is not None)
    return ok(True, t0)


def qinco_settings(given: schemas.QincoSettings | None, settings: Settings) -> dict:
    """A new collection's settings: those given, the server's defaults for the rest."""
    q = {"bytes": settings.train_bytes, "train_after": settings.train_after,
         "train_minutes": settings.train_minutes, "keep_originals": settings.keep_originals, "nlist": None}
    q.update(given.model_dump(exclude_none=True) if given else {})
    need = min_points(q["nlist"])
    if q["train_after"] and q["train_after"] < need:
        raise ApiError(400, f"train_after {q['train_after']} is too small: a model needs at least {need} points"
                            + (f" (nlist {q['nlist']} x {MIN_PER_LIST} per list)" if q["nlist"] else ""))
    return q


@router.post("/collections/{name}/train", status_code=202, response_model=schemas.Envelope[schemas.QincoStatus])
def train(body: schemas.TrainRequest | None = None, c: Collection = Depends(collection),
          svc: Service = Depends(ready)):
    """Train a new model on the collection's original vectors (or swap in `model`), encode every
    point and switch to it, in the background: searches and writes go on."""
    t0 = time.perf_counter()
    body = body or schemas.TrainRequest()
    if body.model is not None:
        status = svc.call(c.start_training, model_source=svc.call(svc.store.resolve, body.model))
    else:
        status = svc.call(c.start_training, {"train_minutes": body.minutes, "bytes": body.bytes, "nlist": body.nlist})
    return ok(status, t0, 202)


@router.delete("/collections/{name}/train", response_model=schemas.Envelope[bool])
def cancel_training(c: Collection = Depends(collection), svc: Service = Depends(ready)):
    """Stop the training job; the model that served before keeps serving."""
    t0 = time.perf_counter()
    if not svc.call(c.cancel_training):
        raise ApiError(409, f"the job of collection {c.name!r} finished before it could be cancelled")
    return ok(True, t0)


@router.get("/collections/{name}/exists", response_model=schemas.Envelope[schemas.Exists])
async def collection_exists(name: str, svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    return ok({"exists": name in svc.store.collections or name in svc.store.failed}, t0)


@router.get("/collections/{name}", response_model=schemas.Envelope[schemas.CollectionInfo])
def get_collection(name: str, svc: Service = Depends(ready)):
    """A collection that failed to open answers with status "red" and the reason."""
    t0 = time.perf_counter()
    reason = svc.store.failed.get(name)
    if reason is not None:
        return ok({"name": name, "status": "red", "error": reason}, t0)
    return ok(svc.call(svc.store.get, name).info(), t0)


@router.delete("/collections/{name}", response_model=schemas.Envelope[bool])
def delete_collection(name: str, svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    svc.call(svc.store.delete, name)
    svc.metrics.forget(name)
    return ok(True, t0)


@router.put("/collections/{name}/index", response_model=schemas.Envelope[schemas.UpdateResult])
def create_field_index(body: schemas.CreateFieldIndex, c: Collection = Depends(collection),
                       svc: Service = Depends(ready)):
    """A payload index: filters on the field never read payload JSON (built now, kept up to date)."""
    t0 = time.perf_counter()
    return ok(update_result(svc.call(c.create_field_index, body.field_name, body.field_schema.value)), t0)


@router.delete("/collections/{name}/index/{field_name}", response_model=schemas.Envelope[schemas.UpdateResult])
def delete_field_index(field_name: schemas.PayloadKey, c: Collection = Depends(collection),
                       svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    return ok(update_result(svc.call(c.delete_field_index, field_name)), t0)
