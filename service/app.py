"""The FastAPI app: thin routes over service.store, auth, limits, errors, metrics."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager

import orjson
from fastapi import Depends, FastAPI, Path
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from fastapi_offline import FastAPIOffline  # /docs and /redoc from bundled assets, no CDN
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.threads import use_threads

from . import schemas
from .settings import Settings
from .store import BadRequest, Collection, Conflict, NotFound, SearchBudget, Store, Unavailable

log = logging.getLogger("qinco.service")
# Open without the key: health, and the API's shape (docs, their assets, the OpenAPI document).
# /metrics needs the key, as in Qdrant: see the README for Prometheus.
PUBLIC = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
PUBLIC_PREFIX = "/static-offline-docs/"
MAX_ERRORS_SHOWN = 5
MAX_SEARCH_GROUPS = 64


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


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


class JSON(Response):
    """A JSON response serialised by orjson, straight from the result (no jsonable_encoder pass)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def error(status: int, message: str) -> JSON:
    return JSON({"status": {"error": message}, "time": 0.0}, status_code=status)


class Guard:
    """Pure ASGI middleware: API key, body size limit, request metrics.

    The body limit counts bytes as they arrive (chunked bodies too) and answers 413
    before the route sees the body; the body is then replayed to the app.
    """

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        rejection = self._check_key(scope) or self._check_length(scope)
        if rejection is None and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            rejection, receive = await self._read_body(receive)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if rejection is not None:
                await rejection(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
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


def hit_json(hit, with_payload) -> dict:
    """A search hit (Qdrant's ScoredPoint): id, version, score, payload when asked for (even
    null), vector when present.  Points carry no version of their own here: 0."""
    out = {"id": hit.id, "version": 0, "score": hit.score}
    if with_payload is not False:
        out["payload"] = project(hit.payload, with_payload)
    if hit.vector is not None:
        out["vector"] = hit.vector
    return out


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


def ok(result, started: float) -> JSON:
    """Qdrant's envelope."""
    return JSON({"result": result, "status": "ok", "time": round(time.perf_counter() - started, 6)})


def create_app(settings: Settings | None = None, start_loading: bool = True) -> FastAPI:
    """The app over the data directory, which it locks (a second server on it is refused)."""
    settings = settings or Settings()
    store = Store(settings.data_dir, settings.snapshot_every, settings.threads)
    metrics = Metrics()
    state = {"ready": False, "error": None}

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
                         description="Vector search over QINCo-compressed vectors. `score` is the Euclidean "
                                     "distance for l2 collections (lower is nearer) and the cosine similarity "
                                     "for cosine collections (higher is nearer).")
    app.state.store, app.state.settings, app.state.metrics, app.state.load = store, settings, metrics, load

    app.add_middleware(Guard, settings=settings, metrics=metrics)

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

    # ---- dependencies ---------------------------------------------------------------------
    async def ready():  # async: no thread hop for a dictionary look-up
        if not state["ready"]:
            raise ApiError(503, state["error"] or "collections are still loading")

    async def collection(name: str, _=Depends(ready)) -> Collection:
        try:
            return store.get(name)
        except NotFound as e:
            raise ApiError(404, e.args[0]) from None
        except Unavailable as e:
            raise ApiError(503, str(e)) from None

    def translate(fn, *args, **kwargs):
        """Store errors -> HTTP errors; threads are set here, in the thread that does the work."""
        use_threads(settings.threads)
        try:
            return fn(*args, **kwargs)
        except NotFound as e:
            raise ApiError(404, e.args[0]) from None
        except Conflict as e:
            raise ApiError(409, str(e)) from None
        except BadRequest as e:
            raise ApiError(400, str(e)) from None
        except Unavailable as e:
            raise ApiError(503, str(e)) from None

    def check_batch(n: int, what: str):
        if n > settings.max_batch:
            raise ApiError(413, f"{n} {what} in one request; the limit is {settings.max_batch}")

    def check_limit(limit: int):
        if limit > settings.max_limit:
            raise ApiError(400, f"limit must be at most {settings.max_limit}, got {limit}")

    # ---- health and metrics ---------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return error(503, state["error"] or "collections are still loading")
        return {"status": "ready", "collections": len(store.collections), "failed": dict(store.failed),
                **({"demo_error": state["demo_error"]} if "demo_error" in state else {})}

    @app.get("/metrics")
    def metrics_endpoint():
        for name, c in list(store.collections.items()):
            metrics.points.labels(name).set(c.count())
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- collections ----------------------------------------------------------------------
    @app.get("/collections")
    def list_collections(_=Depends(ready)):
        t0 = time.perf_counter()
        return ok({"collections": [{"name": n} for n in store.names()]}, t0)

    @app.put("/collections/{name}")
    def create_collection(name: schemas.CollectionName, body: schemas.CreateCollection, _=Depends(ready)):
        t0 = time.perf_counter()
        source = translate(store.resolve, body.model or body.index)
        c = translate(store.create, name, body.metric.value, body.encoder.value, source, body.index is not None)
        return ok(c.info(), t0)

    @app.get("/collections/{name}/exists")
    async def collection_exists(name: str, _=Depends(ready)):
        t0 = time.perf_counter()
        return ok({"exists": name in store.collections or name in store.failed}, t0)

    @app.get("/collections/{name}")
    def get_collection(name: str, _=Depends(ready)):
        """A collection that failed to open answers with status "red" and the reason."""
        t0 = time.perf_counter()
        reason = store.failed.get(name)
        if reason is not None:
            return ok({"name": name, "status": "red", "error": reason}, t0)
        return ok(translate(store.get, name).info(), t0)

    @app.delete("/collections/{name}")
    def delete_collection(name: str, _=Depends(ready)):
        t0 = time.perf_counter()
        translate(store.delete, name)
        try:
            metrics.points.remove(name)
        except KeyError:  # never scraped: no gauge yet
            pass
        return ok(True, t0)

    # ---- points ---------------------------------------------------------------------------
    @app.put("/collections/{name}/points")
    def upsert(body: schemas.UpsertPoints, c: Collection = Depends(collection)):
        t0 = time.perf_counter()
        ids, vectors, payloads = body.columns()
        check_batch(len(ids), "points")
        seq, encode_seconds = translate(c.upsert, ids, vectors, payloads)
        metrics.encode.observe(encode_seconds)
        return ok({"operation_id": seq, "status": "completed", "count": len(ids)}, t0)

    @app.post("/collections/{name}/points/delete")
    def delete_points(body: schemas.DeletePoints, c: Collection = Depends(collection)):
        """By ids, or every point a filter lets through."""
        t0 = time.perf_counter()
        if body.filter is not None:
            seq, existed = translate(c.delete_filtered, body.filter)
        else:
            check_batch(len(body.points), "ids")
            seq, existed = translate(c.delete, body.points)
        return ok({"operation_id": seq, "status": "completed", "count": existed}, t0)

    @app.get("/collections/{name}/points/count")
    def count(c: Collection = Depends(collection)):
        t0 = time.perf_counter()
        return ok({"count": c.count()}, t0)

    @app.post("/collections/{name}/points/count")
    def count_filtered(body: schemas.CountRequest, c: Collection = Depends(collection)):
        """Qdrant's count: every point, or those a filter lets through (always exact)."""
        t0 = time.perf_counter()
        n = c.count() if body.filter is None else translate(c.count_filtered, body.filter)
        return ok({"count": n}, t0)

    @app.put("/collections/{name}/index")
    def create_field_index(body: schemas.CreateFieldIndex, c: Collection = Depends(collection)):
        """A payload index: filters on the field never read payload JSON (built now, kept up to date)."""
        t0 = time.perf_counter()
        seq = translate(c.create_field_index, body.field_name, body.field_schema.value)
        return ok({"operation_id": seq, "status": "completed"}, t0)

    @app.delete("/collections/{name}/index/{field_name}")
    def delete_field_index(field_name: schemas.PayloadKey, c: Collection = Depends(collection)):
        t0 = time.perf_counter()
        seq = translate(c.delete_field_index, field_name)
        return ok({"operation_id": seq, "status": "completed"}, t0)

    @app.get("/collections/{name}/points/{point_id}")
    def get_point(point_id: int = Path(ge=0, le=schemas.MAX_ID), with_vector: bool = False,
                  c: Collection = Depends(collection)):
        t0 = time.perf_counter()
        return ok(translate(c.get, point_id, with_vector), t0)

    def run_search(c: Collection, searches: list, exclude: list[set[int]] | None = None) -> list[list[dict]]:
        """Searches (SearchRequest or QueryRequest with its vector in `vector`): those that share
        their options go through the shortlist and the decoder together."""
        results: list = [None] * len(searches)
        groups: dict = {}
        for i, s in enumerate(searches):
            check_limit(s.limit + s.offset)
            options = s.model_dump_json(exclude={"vector", "query"})
            groups.setdefault(options, []).append(i)
            if len(groups) > MAX_SEARCH_GROUPS:  # each group evaluates its filter and scans on its own
                raise ApiError(400, f"a batch may hold at most {MAX_SEARCH_GROUPS} different sets of search "
                                    f"options (limit, params, filter, ...)")
        t0 = time.perf_counter()
        budget = SearchBudget(settings.max_search_candidates)  # for the whole request, all groups
        for members in groups.values():
            first = searches[members[0]]
            hits = translate(c.search, [searches[i].vector for i in members], first.limit + first.offset,
                             first.params.for_store() if first.params else None,
                             wants_payload(first.with_payload), first.with_vector, budget=budget,
                             filter=first.filter, exclude=[exclude[i] for i in members] if exclude else None)
            for i, h in zip(members, hits):
                h = h[first.offset:]
                if first.score_threshold is not None:
                    t = first.score_threshold
                    h = [x for x in h if (x.score >= t if c.metric == "cosine" else x.score <= t)]
                results[i] = [hit_json(x, first.with_payload) for x in h]
        metrics.search.observe(time.perf_counter() - t0)
        return results

    @app.post("/collections/{name}/points/search")
    def search(body: schemas.SearchRequest, c: Collection = Depends(collection)):
        t0 = time.perf_counter()
        return ok(run_search(c, [body])[0], t0)

    @app.post("/collections/{name}/points/search/batch")
    def search_batch(body: schemas.SearchBatch, c: Collection = Depends(collection)):
        t0 = time.perf_counter()
        check_batch(len(body.searches), "searches")
        return ok(run_search(c, body.searches), t0)

    @app.post("/collections/{name}/points/recommend")
    def recommend(body: schemas.RecommendRequest, c: Collection = Depends(collection)):
        """Neighbours of stored points (their mean decoded vector), the points themselves excluded."""
        t0 = time.perf_counter()
        check_limit(body.limit)
        vectors = [translate(c.vector, i) for i in body.positive]
        query = sum(vectors) / len(vectors)
        hits = translate(c.search, [query], body.limit, body.params.for_store() if body.params else None,
                         body.with_payload, False, exclude=[set(body.positive)],
                         budget=SearchBudget(settings.max_search_candidates), filter=body.filter)[0]
        return ok([hit_json(x, body.with_payload) for x in hits], t0)

    def as_searches(c: Collection, queries: list[schemas.QueryRequest]):
        """Queries with their vectors: given, or a stored point's (which is then left out)."""
        searches, exclude = [], []
        for q in queries:
            target = q.query.nearest if isinstance(q.query, schemas.NearestQuery) else q.query
            if isinstance(target, int):
                vector, skip = translate(c.vector, target), {target}
            else:
                vector, skip = target, set()
            searches.append(schemas.SearchRequest.model_construct(
                vector=vector, limit=q.limit, offset=q.offset, score_threshold=q.score_threshold, params=q.params,
                filter=q.filter, with_payload=q.with_payload, with_vector=q.with_vector))
            exclude.append(skip)
        return searches, exclude

    @app.post("/collections/{name}/points/query")
    def query_points(body: schemas.QueryRequest, c: Collection = Depends(collection)):
        """Qdrant's universal query, for one dense vector: {"points": [ScoredPoint]}."""
        t0 = time.perf_counter()
        searches, exclude = as_searches(c, [body])
        return ok({"points": run_search(c, searches, exclude)[0]}, t0)

    @app.post("/collections/{name}/points/query/batch")
    def query_batch(body: schemas.QueryBatch, c: Collection = Depends(collection)):
        t0 = time.perf_counter()
        check_batch(len(body.searches), "queries")
        searches, exclude = as_searches(c, body.searches)
        return ok([{"points": hits} for hits in run_search(c, searches, exclude)], t0)

    def record_json(r: dict, with_payload) -> dict:
        out = {"id": r["id"], "payload": project(r["payload"], with_payload) if with_payload is not False else None}
        if "vector" in r:
            out["vector"] = r["vector"]
        return out

    @app.post("/collections/{name}/points")
    def retrieve(body: schemas.RetrieveRequest, c: Collection = Depends(collection)):
        """Qdrant's retrieve: the stored points among the ids (absent ones left out)."""
        t0 = time.perf_counter()
        check_batch(len(body.ids), "ids")
        records = translate(c.records, body.ids, wants_payload(body.with_payload), body.with_vector)
        return ok([record_json(r, body.with_payload) for r in records], t0)

    @app.post("/collections/{name}/points/scroll")
    def scroll(body: schemas.ScrollRequest, c: Collection = Depends(collection)):
        """Points by ascending id, a page at a time; `next_page_offset` is the next page's `offset`."""
        t0 = time.perf_counter()
        check_limit(body.limit)
        records, nxt = translate(c.scroll, body.filter, body.offset, body.limit, wants_payload(body.with_payload),
                                 body.with_vector)
        return ok({"points": [record_json(r, body.with_payload) for r in records], "next_page_offset": nxt}, t0)

    def payload_write(c: Collection, points, filter, change):
        if points is not None:
            check_batch(len(points), "ids")
        seq, n = translate(c.update_payloads, points, filter, change)
        return {"operation_id": seq, "status": "completed", "count": n}

    @app.post("/collections/{name}/points/payload")
    def set_payload(body: schemas.SetPayload, c: Collection = Depends(collection)):
        """Set these payload keys (others stay) on the points given by ids or a filter."""
        t0 = time.perf_counter()
        return ok(payload_write(c, body.points, body.filter, lambda p: {**p, **body.payload}), t0)

    @app.put("/collections/{name}/points/payload")
    def overwrite_payload(body: schemas.SetPayload, c: Collection = Depends(collection)):
        """Replace the whole payload of the points given by ids or a filter."""
        t0 = time.perf_counter()
        return ok(payload_write(c, body.points, body.filter, lambda p: dict(body.payload)), t0)

    @app.post("/collections/{name}/points/payload/delete")
    def delete_payload_keys(body: schemas.DeletePayload, c: Collection = Depends(collection)):
        t0 = time.perf_counter()
        keys = set(body.keys)
        return ok(payload_write(c, body.points, body.filter,
                                lambda p: {k: v for k, v in p.items() if k not in keys}), t0)

    @app.post("/collections/{name}/points/payload/clear")
    def clear_payload(body: schemas.DeletePoints, c: Collection = Depends(collection)):
        t0 = time.perf_counter()
        return ok(payload_write(c, body.points, body.filter, lambda p: None), t0)

    return app
