"""Health, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...errors import NotFound
from ..deps import Service, service
from ..errors import error

router = APIRouter(tags=["service"])

# The Qdrant REST API these routes follow: that of the qdrant-client release the tests run
# (clients compare it with their own version and warn when they are more than a minor apart).
QDRANT_API_VERSION = "1.20.0"


@router.get("/")
async def root():
    """Qdrant's root: the server's title and version (unwrapped, as Qdrant answers it)."""
    return {"title": "QINCo Search (Qdrant REST API)", "version": QDRANT_API_VERSION}



@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(svc: Service = Depends(service)):
    startup, store = svc.startup, svc.store
    if not startup.ready:
        return error(503, startup.error or "collections are still loading")
    return {"status": "ready", "collections": len(store.collections), "failed": dict(store.failed),
            **({"demo_error": startup.demo_error} if startup.demo_error is not None else {})}


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(svc: Service = Depends(service)):
    for name, c in list(svc.store.collections.items()):
        try:
            svc.metrics.observe(name, c.info())
        except NotFound:  # deleted meanwhile
            svc.metrics.forget(name)
    return PlainTextResponse(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
