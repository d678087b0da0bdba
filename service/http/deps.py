"""What every route shares: the service's state, its dependencies (readiness, the collection
lookup), the request limits, JSON bodies parsed fast, and running work off the event loop."""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field

import pydantic_core
from fastapi import Depends, Request
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from ..engine import query
from ..engine.collection import Collection
from ..engine.registry import Store
from ..errors import PayloadTooLarge, Unavailable
from ..settings import Settings
from .batching import SearchBatcher


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


@dataclass
class Startup:
    """How loading the collections went (reported by /readyz)."""
    ready: bool = False
    error: str | None = None  # loading failed: the service stays up to say why
    demo_error: str | None = None  # the demo collection could not be made (it resumes at the next start)


@dataclass
class Service:
    """The app's state: the store, the settings, the metrics, and how loading went."""

    store: Store
    settings: Settings
    metrics: object
    startup: Startup = field(default_factory=Startup)
    in_flight: int = 0  # HTTP requests being served (counted by middleware.Guard, on the event loop)
    batchers: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    _batchers_lock: threading.Lock = field(default_factory=threading.Lock)

    def batcher(self, c: Collection) -> SearchBatcher:
        """The collection's search batcher, made on first use.  It holds the collection weakly: a
        deleted collection's memory and files go with it."""
        with self._batchers_lock:
            if c not in self.batchers:
                ref = weakref.ref(c)
                self.batchers[c] = SearchBatcher(lambda group: query.search_group(ref(), group),
                                                 self.metrics.search_batch.observe)
            return self.batchers[c]

    def lone_search(self, c: Collection):
        """How a lone search on `c` joins the others running at the same time (engine/query.py)."""
        return lambda q: self.batcher(c).search(q, q.options)

    def check_batch(self, n: int, what: str):
        if n > self.settings.max_batch:
            raise PayloadTooLarge(f"{n} {what} in one request; the limit is {self.settings.max_batch}")


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
    if not svc.startup.ready:
        raise Unavailable(svc.startup.error or "collections are still loading")
    return svc


async def collection(name: str, svc: Service = Depends(ready)) -> Collection:
    return svc.store.get(name)
