"""The FastAPI app: the service's state, the middleware, the error handlers and a router per
resource (service/http/routers/: health, collections, points, search); routes are thin calls of
the engine through the dependencies in deps.py."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline  # /docs and /redoc from bundled assets, no CDN

from model.threads import use_threads

from ..engine.registry import Store
from ..settings import Settings
from . import errors
from .deps import Service
from .metrics import Metrics
from .middleware import Guard
from .routers import collections, health, points, search

log = logging.getLogger("qinco.service")


def load(svc: Service):
    """Open the collections (and make the demo one on a first start), in the loader thread."""
    store, settings, startup = svc.store, svc.settings, svc.startup
    use_threads(settings.threads)
    try:
        store.open_all()  # a collection that fails is listed in store.failed; the others serve
    except Exception as e:  # reported by /readyz; the process stays up for diagnosis
        log.exception("loading collections failed")
        startup.error = f"loading collections failed: {e}"
        return
    try:
        if settings.demo:
            from ..demo import ensure_demo_collection
            ensure_demo_collection(store, settings)
    except Exception as e:  # the collections serve; the demo resumes at the next start
        log.exception("creating the demo collection failed")
        startup.demo_error = f"creating the demo collection failed (it resumes at the next start): {e}"
    startup.ready = True


def create_app(settings: Settings | None = None, start_loading: bool = True) -> FastAPI:
    """The app over the data directory, which it locks (a second server on it is refused)."""
    settings = settings or Settings()
    svc = Service(Store(settings.data_dir, settings.collection_config()), settings, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_loading:
            threading.Thread(target=load, args=(svc,), daemon=True, name="loader").start()
        yield
        svc.store.close()

    app = FastAPIOffline(title="QINCo Search", version="0.1.0", lifespan=lifespan,
                         openapi_tags=[{"name": t} for t in ("service", "collections", "points", "search")],
                         description="Vector search over QINCo-compressed vectors. `score` is the Euclidean "
                                     "distance for l2 collections (lower is nearer) and the cosine similarity "
                                     "for cosine collections (higher is nearer).")
    app.state.service = svc
    app.add_middleware(Guard, svc=svc)
    errors.install(app)
    for router in (search.router, health.router, collections.router, points.router):  # the hottest first
        app.include_router(router)
    return app
