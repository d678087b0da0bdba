"""Collections: create, list, info, exists, delete; payload indexes."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from .. import schemas
from ..deps import Service, collection, ok, ready, update_result
from ..store import Collection

router = APIRouter(tags=["collections"], responses=schemas.ERROR_RESPONSES)


@router.get("/collections", response_model=schemas.Envelope[schemas.CollectionsList])
def list_collections(svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    return ok({"collections": [{"name": n} for n in svc.store.names()]}, t0)


@router.put("/collections/{name}", response_model=schemas.Envelope[schemas.CollectionInfo])
def create_collection(name: schemas.CollectionName, body: schemas.CreateCollection, svc: Service = Depends(ready)):
    t0 = time.perf_counter()
    source = svc.call(svc.store.resolve, body.index if body.model is None else body.model)
    c = svc.call(svc.store.create, name, body.metric.value, body.encoder.value, source, body.index is not None)
    return ok(c.info(), t0)


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
    try:
        svc.metrics.points.remove(name)
    except KeyError:  # never scraped: no gauge yet
        pass
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
