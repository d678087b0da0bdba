"""The FastAPI app: the service's state, auth, limits, errors and metrics around an APIRouter per
resource (service/routers/: health, collections, points, search); routes are thin calls of
service.store through the dependencies in service/deps.py."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline  # /docs and /redoc from bundled assets, no CDN
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.threads import use_threads

from .deps import ApiError, Service, error
from .routers import collections, health, points, search
from .settings import Settings
from .store import Store

log = logging.getLogger("qinco.service")
# Open without the key: health, and the API's shape (docs, their assets, the OpenAPI document).
# /metrics needs the key, as in Qdrant: see the README for Prometheus.
PUBLIC = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
PUBLIC_PREFIX = "/static-offline-docs/"
MAX_ERRORS_SHOWN = 5


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("qinco_requests_total", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("qinco_request_seconds", "HTTP request latency", ["route", "method"],
                                 registry=self.registry)
        self.points = Gauge("qinco_points", "points per collection", ["collection"], registry=self.registry)
        self.encode = Histogram("qinco_encode_seconds", "QINCo encoding time per upsert batch",
                                registry=self.registry)
        self.search = Histogram("qinco_search_seconds", "search time per request (all its queries)",
                                registry=self.registry)
        self.search_batch = Histogram("qinco_search_batch_size", "lone searches run together (micro-batching)",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.phase = Gauge("qinco_collection_phase", "1 for the phase a collection is in",
                           ["collection", "phase"], registry=self.registry)
        self.status = Gauge("qinco_collection_status", "1 for the collection's status (Qdrant's colours)",
                            ["collection", "status"], registry=self.registry)
        self.job_progress = Gauge("qinco_training_progress", "progress of the running job's phase, 0 to 1",
                                  ["collection"], registry=self.registry)
        self.job_eta = Gauge("qinco_training_eta_seconds", "estimated seconds left in the running job's phase",
                             ["collection"], registry=self.registry)
        self.mse_vs_rq = Gauge("qinco_model_mse_vs_rq", "validation MSE of the serving model / its RQ start",
                               ["collection"], registry=self.registry)
        self.val_mse = Gauge("qinco_model_val_mse", "validation MSE of the serving model",
                             ["collection"], registry=self.registry)
        self.generation = Gauge("qinco_model_generation", "model generation serving (+1 per swap)",
                                ["collection"], registry=self.registry)
        self.last_swap = Gauge("qinco_model_last_swap_timestamp_seconds", "Unix time of the last model swap",
                               ["collection"], registry=self.registry)
        self.encoded = Gauge("qinco_points_encoded", "points served by the QINCo index",
                             ["collection"], registry=self.registry)
        self.refine_pending = Gauge("qinco_refine_pending", "points served with fast codes, waiting to be re-encoded",
                                    ["collection"], registry=self.registry)
        self.bytes_per_point = Gauge("qinco_bytes_per_point", "bytes per point in memory (estimated) and on disk",
                                     ["collection", "where"], registry=self.registry)

    PHASES = ("collecting", "training", "encoding", "ready")
    STATUSES = ("grey", "yellow", "green", "red")
    WHERE = ("memory", "disk")

    def observe(self, name: str, info: dict):
        """A collection's info as gauges (set at scrape time)."""
        nan = float("nan")
        status, q = info["status"], info["qinco"]
        self.points.labels(name).set(info["points_count"])
        for s in self.STATUSES:
            self.status.labels(name, s).set(float(status == s))
        for phase in self.PHASES:
            self.phase.labels(name, phase).set(float(q["phase"] == phase))
        job, model = q["job"] or {}, q["model"] or {}
        self.job_progress.labels(name).set(job.get("progress", 0.0))
        self.job_eta.labels(name).set(nan if job.get("eta_seconds") is None else job["eta_seconds"])
        self.mse_vs_rq.labels(name).set(model.get("mse_vs_rq") or nan)
        self.val_mse.labels(name).set(model.get("val_mse") or nan)
        self.generation.labels(name).set(model.get("generation", -1))
        self.last_swap.labels(name).set(q["last_swap"] or nan)
        self.encoded.labels(name).set(q["points_encoded"])
        self.refine_pending.labels(name).set(q["refine_pending"])
        for where in self.WHERE:
            self.bytes_per_point.labels(name, where).set(q["bytes_per_point"][where])

    def forget(self, name: str):
        """Drop a deleted collection's series."""
        gauges = [(g, [()]) for g in (self.points, self.job_progress, self.job_eta, self.mse_vs_rq, self.val_mse,
                                      self.generation, self.last_swap, self.encoded, self.refine_pending)]
        gauges += [(self.phase, [(p,) for p in self.PHASES]), (self.status, [(s,) for s in self.STATUSES]),
                   (self.bytes_per_point, [(w,) for w in self.WHERE])]
        for gauge, rest in gauges:
            for labels in rest:
                try:
                    gauge.remove(name, *labels)
                except KeyError:  # never scraped: no series yet
                    pass


class Guard:
    """Pure ASGI middleware: API key, body size limit, request metrics.

    The body limit counts bytes as they arrive (chunked bodies too) and answers 413
    before the route sees the body; the body is then replayed to the app.
    """

    def __init__(self, app, svc: Service):
        self.app, self.svc, self.settings, self.metrics = app, svc, svc.settings, svc.metrics
        self.key = self.settings.api_key.encode() if self.settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.svc.in_flight += 1
        try:
            rejection = self._check_key(scope) or self._check_length(scope)
            if rejection is None and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                rejection, receive = await self._read_body(receive)
            if rejection is not None:
                await rejection(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.svc.in_flight -= 1
            route = scope.get("route")
            template = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(template, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(template, scope["method"]).observe(time.perf_counter() - started)

    def _check_key(self, scope):
        if self.key is None or scope["path"] in PUBLIC or scope["path"].startswith(PUBLIC_PREFIX):
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"api-key", b"")
        auth = headers.get(b"authorization", b"")
        if not given and auth.lower().startswith(b"bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given, self.key):
            return error(401, "missing or wrong API key (send the 'api-key' header or 'Authorization: Bearer')")
        return None

    def _too_large(self):
        return error(413, f"request body over the limit of {self.settings.max_body_bytes} bytes")

    def _check_length(self, scope):
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            return self._too_large()
        return None

    async def _read_body(self, receive):
        """Read the whole body, counting bytes; returns (a 413 response or None, a receive replaying it)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None, receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                return self._too_large(), receive
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


def create_app(settings: Settings | None = None, start_loading: bool = True) -> FastAPI:
    """The app over the data directory, which it locks (a second server on it is refused)."""
    settings = settings or Settings()
    store = Store(settings.data_dir, settings.snapshot_every, settings.threads, settings.training_threads(),
                  settings.train_sample, settings.fast_ingest)
    svc = Service(store, settings, Metrics())
    store, state = svc.store, svc.state

    def load():
        use_threads(settings.threads)
        try:
            store.open_all()  # a collection that fails is listed in store.failed; the others serve
        except Exception as e:  # reported by /readyz; the process stays up for diagnosis
            log.exception("loading collections failed")
            state["error"] = f"loading collections failed: {e}"
            return
        try:
            if settings.demo:
                from .demo import ensure_demo_collection
                ensure_demo_collection(store, settings)
        except Exception as e:  # the collections serve; the demo resumes at the next start
            log.exception("creating the demo collection failed")
            state["demo_error"] = f"creating the demo collection failed (it resumes at the next start): {e}"
        state["ready"] = True

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_loading:
            threading.Thread(target=load, daemon=True, name="loader").start()
        yield
        store.close()

    app = FastAPIOffline(title="QINCo Search", version="0.1.0", lifespan=lifespan,
                         openapi_tags=[{"name": t} for t in ("service", "collections", "points", "search")],
                         description="Vector search over QINCo-compressed vectors. `score` is the Euclidean "
                                     "distance for l2 collections (lower is nearer) and the cosine similarity "
                                     "for cosine collections (higher is nearer).")
    app.state.service = svc
    app.add_middleware(Guard, svc=svc)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        parts = []
        errors = exc.errors()
        for e in errors[:MAX_ERRORS_SHOWN]:
            # pydantic names union branches in the location (`list[...]`, tagged-union tags): keep the path
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body" and not str(p).startswith(("`", "function-")))
            parts.append(f"{where}: {e.get('msg')}" if where else e.get("msg", "invalid"))
        if len(errors) > MAX_ERRORS_SHOWN:
            parts.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more errors")
        return error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    for router in (search.router, health.router, collections.router, points.router):  # the hottest first
        app.include_router(router)
    return app
