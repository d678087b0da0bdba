"""Dynamic micro-batching of lone searches: each request gets its own answer, errors stay its own."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service.http.batching import SearchBatcher
from tests.server import free_port, serve
from tests.test_service import client  # noqa: F401  (fixture)


def test_batcher_groups_concurrent_searches_and_keeps_answers_apart():
    sizes = []

    def run_group(searches):
        sizes.append(len(searches))
        time.sleep(0.02)  # long enough for the others to queue up behind this batch
        if any(s < 0 for s in searches):
            raise ValueError("negative")
        return [[s * 10] for s in searches]

    batcher = SearchBatcher(run_group)
    assert batcher.search(1, "a") == [10] and sizes == [1]  # alone: runs at once, by itself

    def one(i):
        try:
            return batcher.search(i, "odd" if i % 2 else "even")
        except ValueError as e:
            return str(e)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, [-3] + list(range(1, 40))))
    assert got == ["negative"] + [[i * 10] for i in range(1, 40)]  # the bad search fails alone
    assert max(sizes) > 1 and sum(sizes) >= 40


def test_batcher_survives_a_failing_leader():
    def run_group(searches):
        raise RuntimeError("boom")

    batcher = SearchBatcher(run_group)
    with pytest.raises(RuntimeError):
        batcher.search(1, "k")
    assert not batcher._running and not batcher._queues


@pytest.fixture
def live(data_dir):
    port = free_port()
    proc = serve(data_dir, port, "--no-demo")
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def batch_sizes(url):
    text = httpx.get(f"{url}/metrics").text
    count = float(next(line.split()[-1] for line in text.splitlines()
                       if line.startswith("qinco_search_batch_size_count")))
    ones = float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith('qinco_search_batch_size_bucket{le="1.0"}')))
    return count, ones


def test_concurrent_rest_searches_match_lone_ones(live, vectors):
    url = live
    httpx.put(f"{url}/collections/c", json={"model": "models/ivf.safetensors"}, timeout=60).raise_for_status()
    points = [{"id": i, "vector": v.tolist(), "payload": {"n": i, "tag": ["a", "b", "c"][i % 3]}}
              for i, v in enumerate(vectors[:300])]
    httpx.put(f"{url}/collections/c/points", json={"points": points}, timeout=60).raise_for_status()
    # Options per request: shared by half of them, else limits, nshort, filters, payloads, an offset.
    bodies = []
    for i in range(48):
        body = {"vector": vectors[300 + i].tolist(), "limit": 5, "params": {"nshort": 40}}
        if i % 2:  # half share their options (they can batch), half vary them
            body.update(limit=3 + i % 4, params={"nshort": 40 + 20 * (i % 3)})
        if i % 3 == 0:
            body["filter"] = {"must": [{"key": "tag", "match": {"value": "a"}}]}
        if i % 5 == 0:
            body["with_payload"] = True
        if i % 7 == 0:
            body["offset"] = 1
        bodies.append(body)
    bodies.append({"vector": vectors[0].tolist(), "limit": 2000})  # over QINCO_MAX_LIMIT: its own 400

    def ask(client, body):
        r = client.post(f"{url}/collections/c/points/search", json=body)
        return r.status_code, r.json()

    with httpx.Client(timeout=60) as client:
        alone = [ask(client, b) for b in bodies]
    before, _ = batch_sizes(url)
    clients = [httpx.Client(timeout=60) for _ in range(8)]
    lock = threading.Lock()
    together = [None] * len(bodies)

    def worker(k):
        for i in range(k, len(bodies), 8):
            answer = ask(clients[k], bodies[i])
            with lock:
                together[i] = answer

    for _ in range(3):
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for (s1, a), (s2, b) in zip(alone, together):
            assert s1 == s2
            if s1 != 200:
                assert a["status"] == b["status"]
                continue
            assert [h["id"] for h in a["result"]] == [h["id"] for h in b["result"]]
            assert np.allclose([h["score"] for h in a["result"]], [h["score"] for h in b["result"]], atol=1e-5)
            assert [h.get("payload") for h in a["result"]] == [h.get("payload") for h in b["result"]]
    [c.close() for c in clients]
    count, _ = batch_sizes(url)
    # Every search went through the batcher; whether any of them ran together depends on timing,
    # which the unit test above holds fixed (its leader sleeps while the others queue).
    assert count >= before + 3 * (len(bodies) - 1) / 8


def test_searches_with_other_options_run_beside_a_batch():
    together = threading.Barrier(4, timeout=30)  # broken (an error) unless the 4 groups run at once

    def run_group(searches):
        together.wait()
        return [[s] for s in searches]

    batcher = SearchBatcher(run_group)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda k: batcher.search(k, f"options-{k}"), range(4)))
    assert got == [[0], [1], [2], [3]]  # not one after another: each waited for the other three
    assert not batcher._queues and not batcher._running


def test_a_deleted_collection_is_not_kept_alive_by_its_batcher(data_dir, vectors):
    import gc
    import weakref

    from tests.test_service import create, make_client, upsert, wait_ready
    with make_client(data_dir) as client:
        wait_ready(client)
        create(client)
        upsert(client, vectors[:20], range(20))
        assert client.post("/collections/c/points/search", json={"vector": vectors[0].tolist()}).status_code == 200
        svc = client.app.state.service
        ref = weakref.ref(svc.store.get("c"))
        assert len(svc.batchers) == 1
        assert client.delete("/collections/c").status_code == 200
        gc.collect()
        assert ref() is None and len(svc.batchers) == 0


def test_a_lone_light_search_runs_in_the_event_loop(client, vectors, monkeypatch):
    """http.deps.off_loop: a cheap search that is the only request skips the thread hop; a costly
    one (exact, filtered, by stored point) or one beside other requests goes to the pool.
    Both paths answer the same."""
    import asyncio

    from service.engine import query
    from tests.test_service import create, upsert

    where = []
    real = query.run_searches

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append("loop")
        except RuntimeError:
            where.append("thread")
        return real(*args, **kwargs)

    monkeypatch.setattr(query, "run_searches", spy)
    create(client)
    upsert(client, vectors[:200], range(200))
    svc = client.app.state.service

    def search(path, body):
        r = client.post(f"/collections/c/points/{path}", json=body)
        assert r.status_code == 200, r.text
        hits = r.json()["result"]
        return where[-1], [(h["id"], round(h["score"], 5)) for h in (hits["points"] if path == "query" else hits)]

    v = vectors[300].tolist()
    place, alone = search("search", {"vector": v, "limit": 5})  # light at once: the lists need no refresh
    assert place == "loop"
    assert search("query", {"query": v, "limit": 5}) == ("loop", alone)
    assert search("search", {"vector": v, "limit": 5, "params": {"exact": True}})[0] == "thread"
    assert search("search", {"vector": v, "limit": 5, "params": {"nshort": 5000}})[0] == "thread"
    assert search("search", {"vector": v, "limit": 5, "filter": {"must": [{"key": "n", "range": {"gte": 0}}]}})[0] == "thread"
    assert search("query", {"query": 7, "limit": 5})[0] == "thread"
    assert search("search", {"vector": v, "limit": 101})[0] == "thread"
    assert search("search", {"vector": v, "limit": 20, "params": {"nprobe": 1}})[0] == "thread"  # may probe all
    svc.in_flight += 1  # as if another request were being served
    try:
        assert search("search", {"vector": v, "limit": 5}) == ("thread", alone)
    finally:
        svc.in_flight -= 1
    assert svc.in_flight == 0  # every request counted out, errors included
    client.post("/collections/c/points/search", json={"vector": [1.0]})
    client.post("/collections/nope/points/search", json={"vector": v})
    assert svc.in_flight == 0
