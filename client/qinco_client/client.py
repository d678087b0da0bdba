"""Client and AsyncClient: the same methods, the same typed results."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import httpx

from . import _requests as rq
from .errors import ConnectionFailed, from_response
from .models import CollectionInfo, QincoStatus, Record, ScoredPoint, UpdateResult


class _Base:
    def __init__(self, url: str = "http://127.0.0.1:6343", api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.25):
        self.url = url.rstrip("/")
        self.headers = {"api-key": api_key} if api_key else {}
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def _retry_delay(self, call: rq.Call, attempt: int, response: httpx.Response | None = None,
                     error: httpx.TransportError | None = None) -> float | None:
        """Seconds to wait before re-sending, or None to answer with `response`.

        Raises ConnectionFailed when a transport error is final.
        """
        last = attempt == self.retries
        if error is not None:
            # A connect error never reached the server: safe to re-send any call.
            if last or not (call.idempotent or isinstance(error, httpx.ConnectError)):
                raise ConnectionFailed(f"{call.method} {call.path}: {error!r}") from error
        elif last or response.status_code < 500 or not call.idempotent:
            return None
        return self.backoff * 2 ** attempt

    @staticmethod
    def _result(call: rq.Call, response: httpx.Response):
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            raise from_response(response.status_code, body)
        return call.parse(body["result"] if call.enveloped else body)


class Client(_Base):
    """Synchronous client.  `with Client(url) as c: c.search("glove", vector)`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._http.close()

    def _send(self, call: rq.Call):
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(call.method, call.path, json=call.json, params=call.params)
                delay = self._retry_delay(call, attempt, response=response)
            except httpx.TransportError as e:
                response, delay = None, self._retry_delay(call, attempt, error=e)
            if delay is None:
                return self._result(call, response)
            time.sleep(delay)

    # collections
    def create_collection(self, name: str, size: int | None = None, distance: str | None = None, *,
                          model: str | None = None, index: str | None = None, metric: str | None = None,
                          encoder: str | None = None, bytes: int | None = None, train_after: int | None = None,
                          train_minutes: float | None = None, keep_originals: bool | None = None,
                          nlist: int | None = None) -> CollectionInfo:
        """`size` and `distance` ("Cosine" or "Euclid"): a collection that trains its model on its own points
        (the other settings: the server's defaults when None).  Or a trained `model` or `index` file, with
        `metric` ("l2" by default) and `encoder`."""
        qinco = dict(bytes=bytes, train_after=train_after, train_minutes=train_minutes,
                     keep_originals=keep_originals, nlist=nlist)
        self._send(rq.create_collection(name, size, distance, model, index, metric, encoder, qinco))
        return self.get_collection(name)

    def get_collection(self, name: str) -> CollectionInfo:
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
                info = self.get_collection(name)
                show(info)
                if rq.is_ready(info):
                    return info
                if time.monotonic() >= deadline:
                    raise rq.not_ready(info, timeout)
                time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def list_collections(self) -> list[str]:
        return self._send(rq.list_collections())

    def delete_collection(self, name: str) -> bool:
        return self._send(rq.delete_collection(name))

    # points
    def upsert(self, collection: str, ids: Sequence[int], vectors, payloads: Sequence[dict | None] | None = None,
               batch_size: int = 256, progress: bool = True) -> int:
        """Upload points in batches; returns how many were written.  Accepts numpy arrays."""
        done = 0
        with rq.progress(len(ids), progress) as advance:
            for batch in rq.upsert_batches(collection, ids, vectors, payloads, batch_size):
                done += self._send(batch).count
                advance(len(batch.json["points"]))
        return done

    def search(self, collection: str, vector, limit: int = 10, params: dict | None = None,
               target_recall: float | None = None, with_payload: bool = True,
               with_vector: bool = False) -> list[ScoredPoint]:
        return self._send(rq.search(collection, vector, limit, params, target_recall, with_payload, with_vector))

    def search_batch(self, collection: str, vectors, limit: int = 10, params: dict | None = None,
                     target_recall: float | None = None, with_payload: bool = True,
                     with_vector: bool = False) -> list[list[ScoredPoint]]:
        return self._send(rq.search_batch(collection, vectors, limit, params, target_recall, with_payload,
                                          with_vector))

    def recommend(self, collection: str, positive: Sequence[int], limit: int = 10,
                  with_payload: bool = True) -> list[ScoredPoint]:
        return self._send(rq.recommend(collection, positive, limit, with_payload))

    def get(self, collection: str, point_id: int | str, with_vector: bool = False) -> Record:
        return self._send(rq.get(collection, point_id, with_vector))

    def delete(self, collection: str, ids: Sequence[int]) -> UpdateResult:
        return self._send(rq.delete(collection, ids))

    def count(self, collection: str) -> int:
        return self._send(rq.count(collection))

    def health(self) -> dict[str, Any]:
        return self._send(rq.health())


class AsyncClient(_Base):
    """Asynchronous client with the methods of Client, awaited."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        await self._http.aclose()

    async def _send(self, call: rq.Call):
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(call.method, call.path, json=call.json, params=call.params)
                delay = self._retry_delay(call, attempt, response=response)
            except httpx.TransportError as e:
                response, delay = None, self._retry_delay(call, attempt, error=e)
            if delay is None:
                return self._result(call, response)
            await asyncio.sleep(delay)

    async def create_collection(self, name: str, size: int | None = None, distance: str | None = None, *,
                                model: str | None = None, index: str | None = None, metric: str | None = None,
                                encoder: str | None = None, bytes: int | None = None,
                                train_after: int | None = None, train_minutes: float | None = None,
                                keep_originals: bool | None = None, nlist: int | None = None) -> CollectionInfo:
        qinco = dict(bytes=bytes, train_after=train_after, train_minutes=train_minutes,
                     keep_originals=keep_originals, nlist=nlist)
        await self._send(rq.create_collection(name, size, distance, model, index, metric, encoder, qinco))
        return await self.get_collection(name)

    async def get_collection(self, name: str) -> CollectionInfo:
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
                info = await self.get_collection(name)
                show(info)
                if rq.is_ready(info):
                    return info
                if time.monotonic() >= deadline:
                    raise rq.not_ready(info, timeout)
                await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    async def list_collections(self) -> list[str]:
        return await self._send(rq.list_collections())

    async def delete_collection(self, name: str) -> bool:
        return await self._send(rq.delete_collection(name))

    async def upsert(self, collection: str, ids: Sequence[int], vectors,
                     payloads: Sequence[dict | None] | None = None, batch_size: int = 256,
                     progress: bool = True) -> int:
        done = 0
        with rq.progress(len(ids), progress) as advance:
            for batch in rq.upsert_batches(collection, ids, vectors, payloads, batch_size):
                done += (await self._send(batch)).count
                advance(len(batch.json["points"]))
        return done

    async def search(self, collection: str, vector, limit: int = 10, params: dict | None = None,
                     target_recall: float | None = None, with_payload: bool = True,
                     with_vector: bool = False) -> list[ScoredPoint]:
        return await self._send(rq.search(collection, vector, limit, params, target_recall, with_payload,
                                          with_vector))

    async def search_batch(self, collection: str, vectors, limit: int = 10, params: dict | None = None,
                           target_recall: float | None = None, with_payload: bool = True,
                           with_vector: bool = False) -> list[list[ScoredPoint]]:
        return await self._send(rq.search_batch(collection, vectors, limit, params, target_recall, with_payload,
                                                with_vector))

    async def recommend(self, collection: str, positive: Sequence[int], limit: int = 10,
                        with_payload: bool = True) -> list[ScoredPoint]:
        return await self._send(rq.recommend(collection, positive, limit, with_payload))

    async def get(self, collection: str, point_id: int | str, with_vector: bool = False) -> Record:
        return await self._send(rq.get(collection, point_id, with_vector))

    async def delete(self, collection: str, ids: Sequence[int]) -> UpdateResult:
        return await self._send(rq.delete(collection, ids))

    async def count(self, collection: str) -> int:
        return await self._send(rq.count(collection))

    async def health(self) -> dict[str, Any]:
        return await self._send(rq.health())
