"""qdrant-client's clients, plus the calls QINCo Search has and Qdrant does not.

`Client` is a `qdrant_client.QdrantClient` (REST) pointed at a QINCo Search server: every Qdrant
call the server supports (README: "Using the official qdrant-client") works as it does against
Qdrant, with qdrant-client's own models and errors. Added here, typed, the same in `AsyncClient`:
creating a collection with QINCo settings or from a trained model, the collection's QINCo status,
training jobs, and searches with QINCo's parameters (nprobe, nshort, target_recall), which
qdrant-client's `SearchParams` cannot carry. These raise `qinco_client` errors and retry 5xx
answers and lost connections where re-sending is safe.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import httpx
from qdrant_client import AsyncQdrantClient, QdrantClient
from qdrant_client.models import ScoredPoint

from . import _requests as rq
from .errors import ConnectionFailed, from_response
from .models import CollectionInfo, QincoStatus

DEFAULT_URL = "http://127.0.0.1:6343"


class _Calls:
    """Sending QINCo's own calls: retries and errors (shared by both clients)."""

    def _setup(self, url: str, api_key: str | None, timeout: float, retries: int, backoff: float):
        self._qinco_url = url.rstrip("/")
        self._qinco_headers = {"api-key": api_key} if api_key else {}
        self._qinco_timeout, self._qinco_retries, self._qinco_backoff = timeout, retries, backoff

    def _retry_delay(self, call: rq.Call, attempt: int, response: httpx.Response | None = None,
                     error: httpx.TransportError | None = None) -> float | None:
        """Seconds to wait before re-sending, or None to answer with `response`.

        Raises ConnectionFailed when a transport error is final.
        """
        last = attempt == self._qinco_retries
        if error is not None:
            # A connect error never reached the server: safe to re-send any call.
            if last or not (call.idempotent or isinstance(error, httpx.ConnectError)):
                raise ConnectionFailed(f"{call.method} {call.path}: {error!r}") from error
        elif last or response.status_code < 500 or not call.idempotent:
            return None
        return self._qinco_backoff * 2 ** attempt

    @staticmethod
    def _result(call: rq.Call, response: httpx.Response):
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            raise from_response(response.status_code, body)
        return call.parse(body["result"] if call.enveloped else body)


def _qdrant_args(url: str, api_key: str | None, timeout: float, kwargs: dict) -> dict:
    return {"url": url, "api_key": api_key, "timeout": math.ceil(timeout), "prefer_grpc": False,
            "check_compatibility": False, **kwargs}


class Client(_Calls, QdrantClient):
    """`with Client("http://127.0.0.1:6343") as c: c.query_points("glove", query=vector)`."""

    _qinco_http = None  # QdrantClient.__del__ closes even a client whose __init__ failed

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.25, **kwargs):
        """kwargs go to QdrantClient."""
        QdrantClient.__init__(self, **_qdrant_args(url, api_key, timeout, kwargs))
        self._setup(url, api_key, timeout, retries, backoff)
        self._qinco_http = httpx.Client(base_url=self._qinco_url, headers=self._qinco_headers, timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self, **kwargs):
        if self._qinco_http is not None:
            self._qinco_http.close()
        QdrantClient.close(self, **kwargs)

    def _send(self, call: rq.Call):
        for attempt in range(self._qinco_retries + 1):
            try:
                response = self._qinco_http.request(call.method, call.path, json=call.json, params=call.params)
                delay = self._retry_delay(call, attempt, response=response)
            except httpx.TransportError as e:
                response, delay = None, self._retry_delay(call, attempt, error=e)
            if delay is None:
                return self._result(call, response)
            time.sleep(delay)

    def health(self) -> dict[str, Any]:
        """The server's readiness: {"status": "ready", ...}."""
        return self._send(rq.health())

    def create_qinco_collection(self, name: str, size: int | None = None, distance: str | None = None, *,
                                model: str | None = None, index: str | None = None, metric: str | None = None,
                                encoder: str | None = None, bytes: int | None = None,
                                train_after: int | None = None, train_minutes: float | None = None,
                                keep_originals: bool | None = None, nlist: int | None = None,
                                retrain_growth: float | None = None) -> CollectionInfo:
        """`size` and `distance` ("Cosine" or "Euclid"): a collection that trains its model on its own points
        (the other settings: the server's defaults when None).  Or a trained `model` or `index` file, with
        `metric` ("l2" by default) and `encoder`.  (qdrant-client's `create_collection` makes the first kind
        with the server's defaults.)"""
        qinco = dict(bytes=bytes, train_after=train_after, train_minutes=train_minutes,
                     keep_originals=keep_originals, nlist=nlist, retrain_growth=retrain_growth)
        self._send(rq.create_collection(name, size, distance, model, index, metric, encoder, qinco))
        return self.qinco_info(name)

    def qinco_info(self, name: str) -> CollectionInfo:
        """The collection's info with QINCo's fields typed (phase, job, model, bytes per point, ...)."""
        return self._send(rq.get_collection(name))

    def train(self, name: str, minutes: float | None = None, bytes: int | None = None, nlist: int | None = None,
              model: str | None = None) -> QincoStatus:
        """Start training now (a new model), or swap in a trained `model` file; see wait_until_ready."""
        return self._send(rq.train(name, minutes, bytes, nlist, model))

    def cancel_training(self, name: str) -> bool:
        """Stop the job in progress; the old model, if any, keeps serving."""
        return self._send(rq.cancel_training(name))

    def wait_until_ready(self, name: str, timeout: float = 600.0, poll: float = 0.5,
                         progress: bool = True) -> CollectionInfo:
        """Poll until the collection serves from its trained model with no job running.

        Raises TimeoutError after `timeout` seconds, TrainingFailed when the job fails with no model left.
        """
        deadline = time.monotonic() + timeout
        with rq.training_progress(name, progress) as show:
            while True:
                info = self.qinco_info(name)
                show(info)
                if rq.is_ready(info):
                    return info
                if time.monotonic() >= deadline:
                    raise rq.not_ready(info, timeout)
                time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def qinco_search(self, collection: str, vector, limit: int = 10, params: dict | None = None,
                     target_recall: float | None = None, query_filter=None, with_payload: bool = True,
                     with_vector: bool = False) -> list[ScoredPoint]:
        """A search with QINCo's parameters: params {nprobe, nshort, ef_search, exact, rescore}, or the
        tuned `target_recall`.  query_filter: a qdrant_client.models.Filter or its dict."""
        return self._send(rq.search(collection, vector, limit, params, target_recall, query_filter, with_payload,
                                    with_vector))

    def qinco_search_batch(self, collection: str, vectors, limit: int = 10, params: dict | None = None,
                           target_recall: float | None = None, query_filter=None, with_payload: bool = True,
                           with_vector: bool = False) -> list[list[ScoredPoint]]:
        return self._send(rq.search_batch(collection, vectors, limit, params, target_recall, query_filter,
                                          with_payload, with_vector))


class AsyncClient(_Calls, AsyncQdrantClient):
    """qdrant-client's AsyncQdrantClient with the QINCo calls of Client, awaited."""

    _qinco_http = None

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.25, **kwargs):
        AsyncQdrantClient.__init__(self, **_qdrant_args(url, api_key, timeout, kwargs))
        self._setup(url, api_key, timeout, retries, backoff)
        self._qinco_http = httpx.AsyncClient(base_url=self._qinco_url, headers=self._qinco_headers, timeout=timeout)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self, **kwargs):
        if self._qinco_http is not None:
            await self._qinco_http.aclose()
        await AsyncQdrantClient.close(self, **kwargs)

    async def _send(self, call: rq.Call):
        for attempt in range(self._qinco_retries + 1):
            try:
                response = await self._qinco_http.request(call.method, call.path, json=call.json, params=call.params)
                delay = self._retry_delay(call, attempt, response=response)
            except httpx.TransportError as e:
                response, delay = None, self._retry_delay(call, attempt, error=e)
            if delay is None:
                return self._result(call, response)
            await asyncio.sleep(delay)

    async def health(self) -> dict[str, Any]:
        return await self._send(rq.health())

    async def create_qinco_collection(self, name: str, size: int | None = None, distance: str | None = None, *,
                                      model: str | None = None, index: str | None = None, metric: str | None = None,
                                      encoder: str | None = None, bytes: int | None = None,
                                      train_after: int | None = None, train_minutes: float | None = None,
                                      keep_originals: bool | None = None, nlist: int | None = None,
                                      retrain_growth: float | None = None) -> CollectionInfo:
        qinco = dict(bytes=bytes, train_after=train_after, train_minutes=train_minutes,
                     keep_originals=keep_originals, nlist=nlist, retrain_growth=retrain_growth)
        await self._send(rq.create_collection(name, size, distance, model, index, metric, encoder, qinco))
        return await self.qinco_info(name)

    async def qinco_info(self, name: str) -> CollectionInfo:
        return await self._send(rq.get_collection(name))

    async def train(self, name: str, minutes: float | None = None, bytes: int | None = None,
                    nlist: int | None = None, model: str | None = None) -> QincoStatus:
        return await self._send(rq.train(name, minutes, bytes, nlist, model))

    async def cancel_training(self, name: str) -> bool:
        return await self._send(rq.cancel_training(name))

    async def wait_until_ready(self, name: str, timeout: float = 600.0, poll: float = 0.5,
                               progress: bool = True) -> CollectionInfo:
        deadline = time.monotonic() + timeout
        with rq.training_progress(name, progress) as show:
            while True:
                info = await self.qinco_info(name)
                show(info)
                if rq.is_ready(info):
                    return info
                if time.monotonic() >= deadline:
                    raise rq.not_ready(info, timeout)
                await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    async def qinco_search(self, collection: str, vector, limit: int = 10, params: dict | None = None,
                           target_recall: float | None = None, query_filter=None, with_payload: bool = True,
                           with_vector: bool = False) -> list[ScoredPoint]:
        return await self._send(rq.search(collection, vector, limit, params, target_recall, query_filter,
                                          with_payload, with_vector))

    async def qinco_search_batch(self, collection: str, vectors, limit: int = 10, params: dict | None = None,
                                 target_recall: float | None = None, query_filter=None, with_payload: bool = True,
                                 with_vector: bool = False) -> list[list[ScoredPoint]]:
        return await self._send(rq.search_batch(collection, vectors, limit, params, target_recall, query_filter,
                                                with_payload, with_vector))
