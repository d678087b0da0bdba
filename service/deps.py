"""What every route shares: the service's state, its dependencies (readiness, the collection
lookup), store errors as HTTP errors, the request limits, and Qdrant's response shapes."""

from __future__ import annotations

import json
import threading
import time
import weakref
from dataclasses import dataclass, field

import orjson
import pydantic_core
from fastapi import Depends, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from model.threads import use_threads

from .batching import SearchBatcher
from .settings import Settings
from .store import BadRequest, Collection, Conflict, NotFound, Store, Unavailable


class JsonRequest(Request):
    """Bodies parsed by pydantic-core's JSON parser: 6x the standard library's speed on vectors
    (a 1,000 x 384 upsert: 48 instead of 283 ms), the same values (NaN, 1e400, big integers).
    What it refuses goes to the standard library, whose errors FastAPI answers with a 422 and
    which takes what our validators should name (lone surrogates)."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError:
                self._json = json.loads(body)
        return self._json


class JsonRoute(APIRoute):
    """Every router's route class: requests are JsonRequests."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(JsonRequest(request.scope, request.receive))
        return route


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


@dataclass
class Service:
    """The app's state: the store, the settings, the metrics, and whether loading is done."""

    store: Store
    settings: Settings
    metrics: object
    state: dict = field(default_factory=lambda: {"ready": False, "error": None})
    in_flight: int = 0  # HTTP requests being served (counted by app.Guard, on the event loop)
    batchers: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    _batchers_lock: threading.Lock = field(default_factory=threading.Lock)

    def batcher(self, c: Collection, run_group) -> SearchBatcher:
        """The collection's search batcher, made on first use; run_group(collection, searches) -> hits
        each.  It holds the collection weakly: a deleted collection's memory and files go with it."""
        with self._batchers_lock:
            if c not in self.batchers:
                ref = weakref.ref(c)
                self.batchers[c] = SearchBatcher(lambda searches: run_group(ref(), searches),
                                                 self.metrics.search_batch.observe)
            return self.batchers[c]

    def call(self, fn, *args, **kwargs):
        """Run a store call: threads are set here, in the thread that does the work, and store
        errors become HTTP errors."""
        use_threads(self.settings.threads)
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

    def check_batch(self, n: int, what: str):
        if n > self.settings.max_batch:
            raise ApiError(413, f"{n} {what} in one request; the limit is {self.settings.max_batch}")

    def check_limit(self, limit: int):
        if limit > self.settings.max_limit:
            raise ApiError(400, f"limit must be at most {self.settings.max_limit}, got {limit}")


async def off_loop(svc: Service, light: bool, fn, *args):
    """fn(*args) in the thread pool; or here, in the event loop, when it is light and this request
    is the only one: handing it to a thread and back costs more than such a search (1-1.4 ms
    against its 0.5-1 ms on the 2-core machine, bench/RESULTS.md).  With other requests in
    flight the loop stays free for them (and concurrent searches form micro-batches)."""
    if light and svc.in_flight <= 1:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


# ---- dependencies (async: a dictionary look-up needs no thread hop) ------------------------

async def service(request: Request) -> Service:
    return request.app.state.service


async def ready(request: Request) -> Service:
    svc = await service(request)  # called, not a sub-dependency: one level less to solve per request
    if not svc.state["ready"]:
        raise ApiError(503, svc.state["error"] or "collections are still loading")
    return svc


async def collection(name: str, svc: Service = Depends(ready)) -> Collection:
    try:
        return svc.store.get(name)
    except NotFound as e:
        raise ApiError(404, e.args[0]) from None
    except Unavailable as e:
        raise ApiError(503, str(e)) from None


# ---- responses ------------------------------------------------------------------------------

class JSON(Response):
    """A JSON response serialised by orjson, straight from the result (no jsonable_encoder pass)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def ok(result, started: float, status_code: int = 200) -> JSON:
    """Qdrant's envelope."""
    return JSON({"result": result, "status": "ok", "time": round(time.perf_counter() - started, 6)},
                status_code=status_code)


def error(status: int, message: str) -> JSON:
    return JSON({"status": {"error": message}, "time": 0.0}, status_code=status)


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
