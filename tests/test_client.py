"""The SDK against a real server process, sync and async; retries against a flaky real HTTP server."""

import asyncio
import http.server
import json
import threading
import time

import numpy as np
import pytest

from model.io import save_model
from qinco_client import (AsyncClient, BadRequest, Client, CollectionInfo, Conflict, ConnectionFailed, NotFound,
                          ScoredPoint, ServerError, Unauthorized)
from tests.server import free_port, serve

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


def test_sync_client_every_method(server, vectors):
    with Client(server, api_key=KEY, timeout=30) as c:
        assert c.health()["status"] == "ready"
        info = c.create_collection("s", model="models/ivf.safetensors")
        assert isinstance(info, CollectionInfo) and info.dimension == 50
        assert "s" in c.list_collections()
        n = c.upsert("s", np.arange(300), vectors, [{"i": i} for i in range(300)], batch_size=64, progress=False)
        assert n == 300 and c.count("s") == 300 and c.get_collection("s").points_count == 300
        hits = c.search("s", vectors[7], limit=3)
        assert isinstance(hits[0], ScoredPoint) and hits[0].id == 7 and hits[0].payload == {"i": 7}
        hits = c.search("s", vectors[7].tolist(), limit=3, params={"nprobe": 16, "nshort": 100}, with_vector=True)
        assert len(hits[0].vector) == 50
        batch = c.search_batch("s", vectors[:5], limit=2)
        assert [h[0].id for h in batch] == [0, 1, 2, 3, 4]
        assert 7 not in [h.id for h in c.recommend("s", [7], limit=3)]
        rec = c.get("s", 7, with_vector=True)
        assert rec.payload == {"i": 7} and len(rec.vector) == 50
        assert c.delete("s", [7, 8]).count == 2 and c.count("s") == 298
        with pytest.raises(NotFound, match="point 7 not found"):
            c.get("s", 7)
        with pytest.raises(BadRequest, match="expected dim 50, got 3"):
            c.search("s", [1.0, 2.0, 3.0])
        with pytest.raises(BadRequest, match="not been tuned"):
            c.search("s", vectors[0], target_recall=0.9)
        with pytest.raises(Conflict, match="already exists"):
            c.create_collection("s", model="models/ivf.safetensors")
        assert c.delete_collection("s")
        with pytest.raises(NotFound):
            c.count("s")
    with Client(server, api_key="wrong") as c, pytest.raises(Unauthorized, match="API key"):
        c.list_collections()


def test_async_client_every_method(server, vectors):
    async def scenario():
        async with AsyncClient(server, api_key=KEY) as c:
            assert (await c.health())["status"] == "ready"
            await c.create_collection("a", model="models/ivf.safetensors", metric="cosine")
            assert await c.upsert("a", list(range(100)), vectors[:100], progress=False) == 100
            assert await c.count("a") == 100
            hits = await c.search("a", vectors[3], limit=2)
            assert hits[0].id == 3 and hits[0].score > 0.5
            both = await asyncio.gather(c.search("a", vectors[4]), c.search_batch("a", vectors[5:7], limit=1))
            assert both[0][0].id == 4 and [h[0].id for h in both[1]] == [5, 6]
            assert len(await c.recommend("a", [3], limit=2)) == 2
            assert (await c.get("a", 3)).id == 3
            assert (await c.delete("a", [3])).count == 1
            assert "a" in await c.list_collections()
            assert (await c.get_collection("a")).metric == "cosine"
            with pytest.raises(NotFound):
                await c.get("a", 3)
            assert await c.delete_collection("a")
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
            body, status = {"result": {"count": 42}, "status": "ok", "time": 0}, 200
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = _answer

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
        assert c.count("x") == 42
        assert len(Flaky.seen) == 3 and time.perf_counter() - t0 >= 0.05 + 0.1  # two backoffs


def test_async_retries_too(flaky):
    async def go():
        async with AsyncClient(flaky, retries=3, backoff=0.01) as c:
            return await c.count("x")
    assert asyncio.run(go()) == 42 and len(Flaky.seen) == 3


def test_gives_up_after_the_retries(flaky):
    Flaky.failures = 10
    try:
        with Client(flaky, retries=2, backoff=0.01) as c, pytest.raises(ServerError, match="warming up"):
            c.count("x")
        assert len(Flaky.seen) == 3
    finally:
        Flaky.failures = 2


def test_non_idempotent_create_is_not_resent_after_a_5xx(flaky):
    with Client(flaky, retries=3, backoff=0.01) as c, pytest.raises(ServerError):
        c.create_collection("x", model="m")
    assert len(Flaky.seen) == 1


def test_connection_refused_is_retried_then_raised():
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}", retries=2, backoff=0.05) as c:
        t0 = time.perf_counter()
        with pytest.raises(ConnectionFailed):
            c.count("x")
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
