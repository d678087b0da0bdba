"""The SDK against a real server process, sync and async; retries against a flaky real HTTP server."""

import asyncio
import http.server
import json
import threading
import time

import numpy as np
import pytest

from model.io import save_model
from qdrant_client import QdrantClient, models
from qinco_client import (AsyncClient, BadRequest, Client, CollectionInfo, Conflict, ConnectionFailed, NotFound,
                          ServerError, Unauthorized)
from tests.server import free_port, serve, wait_green

KEY = "sdk-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, ivf_model):
    data = tmp_path_factory.mktemp("sdk")
    (data / "models").mkdir()
    save_model(ivf_model, data / "models" / "ivf.safetensors")
    port = free_port()
    proc = serve(data, port, "--no-demo", env={"QINCO_API_KEY": KEY})
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


@pytest.fixture
def vectors(glove_sample):
    return glove_sample[4000:4300]


def test_sync_client_qdrant_calls_and_qinco_calls(server, vectors):
    with Client(server, api_key=KEY, timeout=30) as c:
        assert isinstance(c, QdrantClient)  # every Qdrant call is qdrant-client's own
        assert c.health()["status"] == "ready"
        info = c.create_qinco_collection("s", model="models/ivf.safetensors")
        assert isinstance(info, CollectionInfo) and info.dimension == 50 and info.bytes_per_vector == 3  # the tiny test model
        assert "s" in [x.name for x in c.get_collections().collections]
        c.upload_collection("s", vectors, payload=[{"i": i} for i in range(300)], ids=range(300), batch_size=64)
        assert c.count("s").count == 300 and c.qinco_info("s").points_count == 300
        wait_green(c, "s")
        hits = c.query_points("s", query=vectors[7], limit=3, with_payload=True).points
        assert isinstance(hits[0], models.ScoredPoint) and hits[0].id == 7 and hits[0].payload == {"i": 7}
        hits = c.qinco_search("s", vectors[7].tolist(), limit=3, params={"nprobe": 16, "nshort": 100},
                              with_vector=True)
        assert isinstance(hits[0], models.ScoredPoint) and hits[0].id == 7 and len(hits[0].vector) == 50
        odd = models.Filter(must=[models.FieldCondition(key="i", range=models.Range(gte=8))])
        assert all(h.payload["i"] >= 8 for h in c.qinco_search("s", vectors[7], limit=5, query_filter=odd))
        batch = c.qinco_search_batch("s", vectors[:5], limit=2)
        assert [h[0].id for h in batch] == [0, 1, 2, 3, 4]
        rec = c.retrieve("s", [7], with_vectors=True)[0]
        assert rec.payload == {"i": 7} and len(rec.vector) == 50
        c.delete("s", points_selector=models.PointIdsList(points=[7, 8]))
        assert c.count("s").count == 298 and c.retrieve("s", [7]) == []
        with pytest.raises(BadRequest, match="expected dim 50, got 3"):
            c.qinco_search("s", [1.0, 2.0, 3.0])
        with pytest.raises(BadRequest, match="not been tuned"):
            c.qinco_search("s", vectors[0], target_recall=0.9)
        with pytest.raises(Conflict, match="already exists"):
            c.create_qinco_collection("s", model="models/ivf.safetensors")
        assert c.delete_collection("s")
        with pytest.raises(NotFound):
            c.qinco_info("s")
    with Client(server, api_key="wrong") as c, pytest.raises(Unauthorized, match="API key"):
        c.qinco_info("s")


def test_async_client_qdrant_calls_and_qinco_calls(server, vectors):
    async def scenario():
        async with AsyncClient(server, api_key=KEY) as c:
            assert (await c.health())["status"] == "ready"
            await c.create_qinco_collection("a", model="models/ivf.safetensors", metric="cosine")
            await c.upsert("a", models.Batch(ids=list(range(100)), vectors=vectors[:100].tolist()))
            assert (await c.count("a")).count == 100
            while (await c.get_collection("a")).status != "green":  # see wait_green
                await asyncio.sleep(0.05)
            hits = await c.qinco_search("a", vectors[3], limit=2)
            assert hits[0].id == 3 and hits[0].score > 0.5
            both = await asyncio.gather(c.query_points("a", query=vectors[4].tolist()),
                                        c.qinco_search_batch("a", vectors[5:7], limit=1))
            assert both[0].points[0].id == 4 and [h[0].id for h in both[1]] == [5, 6]
            assert (await c.qinco_info("a")).metric == "cosine"
            assert await c.delete_collection("a")
            with pytest.raises(NotFound):
                await c.qinco_info("a")
    asyncio.run(scenario())


class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` requests, then a valid count."""
    failures = 2
    seen: list = []

    def _answer(self):
        Flaky.seen.append((self.command, self.path))
        if len(Flaky.seen) <= Flaky.failures:
            body, status = {"status": {"error": "warming up"}}, 503
        else:
            body, status = {"result": True, "status": "ok", "time": 0}, 200
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    Flaky.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_retries_5xx_with_backoff_then_recovers(flaky):
    with Client(flaky, retries=3, backoff=0.05) as c:
        t0 = time.perf_counter()
        assert c.cancel_training("x") is True
        assert len(Flaky.seen) == 3 and time.perf_counter() - t0 >= 0.05 + 0.1  # two backoffs


def test_async_retries_too(flaky):
    async def go():
        async with AsyncClient(flaky, retries=3, backoff=0.01) as c:
            return await c.cancel_training("x")
    assert asyncio.run(go()) is True and len(Flaky.seen) == 3


def test_gives_up_after_the_retries(flaky):
    Flaky.failures = 10
    try:
        with Client(flaky, retries=2, backoff=0.01) as c, pytest.raises(ServerError, match="warming up"):
            c.cancel_training("x")
        assert len(Flaky.seen) == 3
    finally:
        Flaky.failures = 2


def test_non_idempotent_create_is_not_resent_after_a_5xx(flaky):
    with Client(flaky, retries=3, backoff=0.01) as c, pytest.raises(ServerError):
        c.create_qinco_collection("x", model="m")
    assert len(Flaky.seen) == 1


def test_connection_refused_is_retried_then_raised():
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}", retries=2, backoff=0.05) as c:
        t0 = time.perf_counter()
        with pytest.raises(ConnectionFailed):
            c.qinco_info("x")
        assert time.perf_counter() - t0 >= 0.05 + 0.1


def test_server_that_comes_up_late_is_reached(tmp_path, ivf_model):
    """Connection errors are retried with backoff until a real server starts."""
    port = free_port()
    result = {}

    def call():
        with Client(f"http://127.0.0.1:{port}", retries=8, backoff=0.25) as c:
            result["health"] = c.health()

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    proc = serve(tmp_path, port, "--no-demo")
    try:
        t.join(timeout=120)
        assert result["health"]["status"] == "ready"
    finally:
        proc.kill()
        proc.wait()
