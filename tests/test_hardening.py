"""Defects found by reading the service and by sending it what users send: each one pinned down.

Poisoned payloads, numbers past the range of their fields, a snapshot racing a
delete and re-create, a write failing after its commit, two servers on one data
directory, one broken collection beside healthy ones, an interrupted demo, threads
in request workers, chunked bodies, /metrics and the key.
"""

import json
import shutil
import subprocess
import sys
import threading
import time

import faiss
import numpy as np
import numba
import pytest

from service import errors
from service.engine import snapshots
from service.engine.collection import Collection
from service.engine.registry import DataDirLocked, Store
from tests.server import ROOT, free_port
from tests.test_service import create, make_client, upsert, wait_ready


@pytest.fixture
def filled(data_dir, vectors):
    """A client over a collection `c` of 50 points."""
    with make_client(data_dir) as c:
        wait_ready(c)
        create(c)
        upsert(c, vectors[:50], range(50))
        yield c


def raw(client, method, path, text):
    return client.request(method, path, content=text, headers={"content-type": "application/json"})


def probe(client, vectors):
    body = {"searches": [{"vector": v.tolist(), "limit": 5} for v in vectors[:10]]}
    r = client.post("/collections/c/points/search/batch", json=body)
    assert r.status_code == 200, r.text
    return r.json()["result"]


@pytest.mark.parametrize("payload", ['{"a": NaN}', '{"a": [1, Infinity]}', '{"a": {"b": -Infinity}}',
                                     '{"w": "\\ud800"}', '{"\\udfff": 1}',
                                     '{"big": 18446744073709551616}', '{"deep": ' + "[" * 40 + "]" * 40 + "}"])
def test_unservable_payloads_are_refused_and_the_collection_stays_readable(filled, vectors, payload):
    before = probe(filled, vectors)
    point = json.dumps({"id": 3, "vector": vectors[60].tolist()})[:-1] + f', "payload": {payload}}}'
    r = raw(filled, "PUT", "/collections/c/points", '{"points": [%s]}' % point)
    assert r.status_code == 422 and "payload" in r.json()["status"]["error"], r.text
    assert filled.get("/collections/c/points/3").json()["result"]["payload"] == {"n": 3}
    assert probe(filled, vectors) == before


@pytest.mark.parametrize("method, path, body", [
    ("get", "/collections/c/points/99999999999999999999999", None),
    ("get", "/collections/c/points/-1", None),
    ("post", "/collections/c/points/search", {"params": {"ef_search": 3_000_000_000}}),
    ("post", "/collections/c/points/search", {"params": {"nprobe": 10**30}}),
    ("post", "/collections/c/points/search", {"params": {"nshort": 10**30}}),
    ("post", "/collections/c/points/search", {"limit": 10**30}),
    ("post", "/collections/c/points/search", {"vector": [3e38] * 50}),
    ("post", "/collections/c/points/search", {"vector": [-1e300] * 50}),
    ("put", "/collections/c/points", {"points": [{"id": 1, "vector": [3e38] * 50}]}),
    ("post", "/collections/c/points/recommend", {"positive": [1], "limit": 10**30}),
    ("post", "/collections/c/points/recommend", {"positive": [1], "params": {"ef_search": 2**40}}),
])
def test_numbers_out_of_range_get_4xx(filled, vectors, method, path, body):
    before = probe(filled, vectors)
    if body is not None and path.endswith("search"):
        body = {"vector": vectors[0].tolist(), **body}
    r = getattr(filled, method)(path, **({"json": body} if body is not None else {}))
    assert 400 <= r.status_code < 500, r.text
    assert len(r.json()["status"]["error"]) > 5
    assert filled.get("/collections/c/points/count").json()["result"]["count"] == 50
    assert probe(filled, vectors) == before


def test_cosine_vectors_of_extreme_values_are_refused_or_stored_at_norm_one(data_dir):
    """A cosine space stores its vectors normalised (its exact search relies on norm 1), even where
    float32 squares would overflow (REST bounds values at 1e12 before that; the engine does not
    rely on it) or vanish."""
    store = Store(data_dir / "engine")
    store.open_all()
    space = store.create("cos", "cosine", "balanced", size=8).space
    for value in (3e19, 1e-22):
        assert np.allclose(np.linalg.norm(space.prepare(np.full((1, 8), value, np.float32))), 1)
    store.close()
    with make_client(data_dir) as c:
        wait_ready(c)
        assert c.put("/collections/cos", json={"vectors": {"size": 8, "distance": "Cosine"}}).status_code == 200
        r = c.put("/collections/cos/points", json={"points": [{"id": 1, "vector": [3e19] * 8}]})
        assert 400 <= r.status_code < 500 and c.get("/collections/cos/points/1").status_code == 404
        r = c.put("/collections/cos/points", json={"points": [{"id": 2, "vector": [1e-22] * 7 + [3e-23]}]})
        assert r.status_code == 200
        stored = c.get("/collections/cos/points/2").json()["result"]["vector"]
        assert abs(sum(v * v for v in stored) - 1) < 1e-5
        assert c.get("/collections/cos/points/count").json()["result"]["count"] == 1


def test_a_search_asking_for_gigabytes_is_refused(data_dir, vectors):
    with make_client(data_dir, max_search_candidates=10_000) as c:
        wait_ready(c)
        create(c)
        upsert(c, vectors[:50], range(50))
        searches = [{"vector": v.tolist(), "limit": 10, "params": {"nshort": 5_000}} for v in vectors[:3]]
        r = c.post("/collections/c/points/search/batch", json={"searches": searches})
        assert r.status_code == 400 and "more than 10000 search candidates" in r.json()["status"]["error"]
        # The budget is the request's, not each group's: different params do not split it.
        searches = [{"vector": v.tolist(), "limit": 10, "params": {"nshort": 4_000, "ef_search": 40 + i}}
                    for i, v in enumerate(vectors[:3])]
        r = c.post("/collections/c/points/search/batch", json={"searches": searches})
        assert r.status_code == 400 and "search candidates" in r.json()["status"]["error"]
        searches = [{"vector": v.tolist(), "limit": 10, "params": {"nshort": 1_000}} for v in vectors[:3]]
        assert c.post("/collections/c/points/search/batch", json={"searches": searches}).status_code == 200


def test_validation_messages_stay_short(filled):
    r = filled.put("/collections/c/points", json={"points": [{"id": 1, "vector": ["x"] * 5000}]})
    assert r.status_code == 422 and len(r.json()["status"]["error"]) < 1000
    assert "more errors" in r.json()["status"]["error"]


def test_chunked_bodies_are_counted(data_dir, vectors):
    with make_client(data_dir, max_body_bytes=4096) as c:
        wait_ready(c)
        create(c)
        small = json.dumps({"points": [{"id": 1, "vector": vectors[0].tolist()}]}).encode()
        big = json.dumps({"points": [{"id": i, "vector": vectors[0].tolist()} for i in range(20)]}).encode()

        def chunks(data):  # an iterator: httpx sends it with Transfer-Encoding: chunked
            for i in range(0, len(data), 100):
                yield data[i:i + 100]

        headers = {"content-type": "application/json"}
        r = c.put("/collections/c/points", content=chunks(big), headers=headers)
        assert r.status_code == 413 and "4096" in r.json()["status"]["error"]
        r = c.put("/collections/c/points", content=chunks(small), headers=headers)
        assert r.status_code == 200, r.text
        assert c.get("/collections/c/points/count").json()["result"]["count"] == 1


def test_metrics_needs_the_key_when_one_is_set(data_dir):
    with make_client(data_dir, api_key="k") as c:
        wait_ready(c)
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200  # the API's shape
        assert c.get("/collections").status_code == 401


def test_delete_and_recreate_during_a_slow_snapshot(data_dir, vectors, monkeypatch):
    store = Store(data_dir)
    old = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    old.upsert(list(range(100)), vectors[:100], [{"v": "old"}] * 100)
    writing, release = threading.Event(), threading.Event()
    real_write = snapshots.atomic_write

    def slow_write(path, write):
        if path.name == "index.faiss":
            writing.set()
            release.wait(10)
        real_write(path, write)

    monkeypatch.setattr(snapshots, "atomic_write", slow_write)
    snap = threading.Thread(target=old.snapshot)
    snap.start()
    assert writing.wait(10)
    deleted = threading.Thread(target=store.delete, args=("c",))
    deleted.start()
    time.sleep(0.3)
    assert deleted.is_alive(), "delete must wait for the snapshot in progress"
    release.set()
    deleted.join(10)
    snap.join(10)
    monkeypatch.setattr(snapshots, "atomic_write", real_write)
    new = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    new.upsert([7, 8], vectors[200:202], [{"v": "new"}] * 2)
    assert not (new.folder / "snapshot").exists()
    store.close()

    store = Store(data_dir)
    store.open_all()
    c = store.get("c")
    assert c.count() == 2 and c.recovery["snapshot_seq"] == 0
    assert c.payloads([7, 8, 1]) == {7: {"v": "new"}, 8: {"v": "new"}}
    store.close()


def test_a_snapshot_of_another_collection_is_refused(data_dir, vectors):
    """Identity: even a snapshot copied into the folder of a same-named collection is not loaded."""
    store = Store(data_dir)
    old = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    old.upsert(list(range(100)), vectors[:100], [None] * 100)
    old.snapshot()
    shutil.copytree(old.folder / "snapshot", data_dir / "saved-snapshot")
    store.delete("c")
    new = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    new.upsert([1000], vectors[:1], [None])
    store.close()
    shutil.copytree(data_dir / "saved-snapshot", data_dir / "collections" / "c" / "snapshot")
    store = Store(data_dir)
    store.open_all()
    assert store.get("c").count() == 1 and store.get("c").recovery["snapshot_seq"] == 0
    store.close()


def test_a_failed_insert_after_the_commit_rebuilds_the_index(data_dir, vectors):
    store = Store(data_dir)
    c = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    c.upsert(list(range(50)), vectors[:50], [None] * 50)
    c.snapshot()
    index = c.space.index
    real_add = index.add

    def failing_add(*args):
        real_add(*args)  # half done, then it fails
        raise MemoryError("simulated")

    index.add = failing_add
    c.upsert([100, 101], vectors[100:102], [None, None])  # committed: served after the rebuild
    assert c.space.index is not index and c.count() == 52
    hits = c.search(vectors[100:102], 1, {"nprobe": 16}, False, False)
    assert [h[0].id for h in hits] == [100, 101]
    seq = c.snapshot()
    store.close()
    store = Store(data_dir)
    store.open_all()
    assert store.get("c").count() == 52 and store.get("c").recovery == {
        **store.get("c").recovery, "snapshot_seq": seq, "replayed": 0}
    store.close()


def test_a_second_server_on_the_same_data_directory_is_refused(data_dir):
    store = Store(data_dir)
    with pytest.raises(DataDirLocked, match="in use by another"):
        Store(data_dir)
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--data-dir", str(data_dir), "--port",
                        str(port), "--no-demo"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "in use by another" in r.stderr
    store.close()
    Store(data_dir).close()  # free again once the first one closed


def test_one_broken_collection_does_not_take_the_others_down(data_dir, vectors):
    store = Store(data_dir)
    for name in ("good", "bad"):
        store.create(name, "l2", "fast", data_dir / "models" / "ivf.safetensors").upsert(
            [1, 2], vectors[:2], [None, None])
    store.close()
    (data_dir / "collections" / "bad" / "model.safetensors").write_bytes(b"garbage")
    with make_client(data_dir) as c:
        wait_ready(c)
        ready = c.get("/readyz")
        assert ready.status_code == 200 and "bad" in ready.json()["failed"]
        assert c.get("/collections/good/points/count").json()["result"]["count"] == 2
        info = c.get("/collections/bad").json()["result"]
        assert info["status"] == "red" and "safetensors" in info["error"]
        assert [x["name"] for x in c.get("/collections").json()["result"]["collections"]] == ["bad", "good"]
        r = c.post("/collections/bad/points/search", json={"vector": vectors[0].tolist()})
        assert r.status_code == 503 and "could not be opened" in r.json()["status"]["error"]
        assert c.put("/collections/bad", json={"model": "models/ivf.safetensors"}).status_code == 409
        assert c.delete("/collections/bad").status_code == 200
        create(c, "bad")
        assert c.get("/readyz").json()["failed"] == {}


def test_an_interrupted_demo_creation_resumes(tmp_path):
    from service.demo import DEMO_MODEL, glove_words
    words, vectors = glove_words(300)
    store = Store(tmp_path)
    (tmp_path / ".demo-pending").touch()  # as the first start leaves it when killed
    store.create("glove", "cosine", "balanced", DEMO_MODEL).upsert(list(range(100)), vectors[:100],
                                                                   [{"word": w} for w in words[:100]])
    store.close()
    settings = {"demo": True, "demo_points": 300}
    with make_client(tmp_path, **settings) as c:
        wait_ready(c, timeout=120)
        assert c.get("/collections/glove/points/count").json()["result"]["count"] == 300
        assert c.get("/collections/glove/points/299").json()["result"]["payload"] == {"word": words[299]}
    assert not (tmp_path / ".demo-pending").exists()


def test_thread_setting_holds_in_request_workers(data_dir, vectors, monkeypatch):
    seen = []
    real_search = Collection.search

    def spy(self, *args, **kwargs):
        seen.append((numba.get_num_threads(), faiss.omp_get_max_threads()))
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(Collection, "search", spy)
    with make_client(data_dir, threads=1) as c:
        wait_ready(c)
        create(c)
        upsert(c, vectors[:20], range(20))
        for v in vectors[:4]:
            assert c.post("/collections/c/points/search", json={"vector": v.tolist()}).status_code == 200
    assert seen and all(s == (1, 1) for s in seen), seen


def test_restart_recovers_from_the_snapshot_plus_the_rows_after_it(data_dir, vectors):
    store = Store(data_dir)
    c = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    c.upsert(list(range(100)), vectors[:100], [None] * 100)
    seq = c.snapshot()
    c.upsert(list(range(100, 130)), vectors[100:130], [None] * 30)
    c.delete([0, 1, 2])
    expected = c.search(vectors[:20], 5, {"nprobe": 16}, False, False)
    store.close()
    store = Store(data_dir)
    store.open_all()
    c = store.get("c")
    assert c.recovery["snapshot_seq"] == seq == 1 and c.recovery["replayed"] == 33
    assert c.count() == 127
    assert c.search(vectors[:20], 5, {"nprobe": 16}, False, False) == expected
    store.close()


def test_reads_of_a_deleted_collection_answer_not_found(data_dir, vectors):
    """A request that resolved a collection just before it was deleted (and re-created)."""
    store = Store(data_dir)
    old = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    old.upsert([1, 2], vectors[:2], [{"v": "old"}, {"v": "old"}])
    store.delete("c")
    with pytest.raises(errors.NotFound):
        old.search(vectors[:1], 1, None, True, False)
    new = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    new.upsert([1], vectors[:1], [{"v": "new"}])
    for read in (lambda: old.get(1, False), lambda: old.payloads([1]), lambda: old.search(vectors[:1], 1, None, True, False)):
        with pytest.raises(errors.NotFound):
            read()
    store.close()


def test_a_broken_index_is_never_snapshotted(data_dir, vectors):
    store = Store(data_dir)
    c = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    c.upsert([1], vectors[:1], [None])
    c.broken = "simulated"
    with pytest.raises(errors.Unavailable):
        c.snapshot()
    with pytest.raises(errors.Unavailable):
        c.upsert([2], vectors[1:2], [None])
    assert not (c.folder / "snapshot").exists()
    store.close()


def test_a_failed_demo_leaves_no_phantom_collection(data_dir, monkeypatch):
    import service.demo

    def broken(n):
        raise OSError("disk on fire")

    monkeypatch.setattr(service.demo, "glove_words", broken)
    with make_client(data_dir, demo=True) as c:
        wait_ready(c)
        ready = c.get("/readyz").json()
        assert "disk on fire" in ready["demo_error"] and ready["failed"] == {}
        assert c.get("/collections").json()["result"]["collections"] == []
        assert c.delete("/collections/glove").status_code == 404
        create(c, "glove")


@pytest.mark.parametrize("body", [{"model": "models/\u0000x"}, {"index": "models"}, {"model": "models"},
                                  {"model": "", "index": None}, {"index": ""}])
def test_unusable_sources_get_400(filled, body):
    r = filled.put("/collections/x", json=body)
    assert r.status_code in (400, 422) and len(r.json()["status"]["error"]) > 5, r.text
    assert str(filled.app.state.service.store.data_dir) not in r.text  # no server paths in messages


def hostile_bodies(v):
    ok = v.tolist()
    nan_filter = '{"filter": {"must": [{"key": "n", "range": {"gt": NaN}}]}}'
    return [
        ("post", "/collections/c/points/scroll", {"limit": 0}),
        ("post", "/collections/c/points/scroll", {"limit": 10**9}),
        ("post", "/collections/c/points/scroll", {"offset": -1}),
        ("post", "/collections/c/points/scroll", {"offset": 2**64}),
        ("post", "/collections/c/points/scroll", nan_filter),
        ("post", "/collections/c/points/scroll", {"with_payload": 5}),
        ("post", "/collections/c/points/query", '{"query": [NaN' + ", 0.1" * 49 + "]}"),
        ("post", "/collections/c/points/query", {"query": []}),
        ("post", "/collections/c/points/query", {"query": {"nearest": "x"}}),
        ("post", "/collections/c/points/query", {"query": ok, "using": "image"}),
        ("post", "/collections/c/points/query", {"query": ok, "prefetch": {"query": ok}}),
        ("post", "/collections/c/points/query", {"query": ok, "offset": 10**9}),
        ("post", "/collections/c/points/query", {"query": ok, "offset": 999, "limit": 999}),  # past max_limit
        ("post", "/collections/c/points/query", '{"query": %s, "score_threshold": Infinity}' % json.dumps(ok)),
        ("post", "/collections/c/points/query", {"query": 2**63}),
        ("post", "/collections/c/points/query", {"query": 123456}),  # no such point
        ("post", "/collections/c/points/query/batch", {"searches": []}),
        ("post", "/collections/c/points/count", {"filter": {"must": [{"key": "n", "range": {"gte": k}} for k in range(65)]}}),
        ("post", "/collections/c/points/count", {"filter": {"should": [{"key": f"k{k}", "match": {"value": 1}} for k in range(9)]}}),
        ("post", "/collections/c/points/scroll", {"with_payload": ["a.b"]}),
        ("post", "/collections/c/points/scroll", {"with_payload": ["k"] * 1001}),
        ("post", "/collections/c/points/payload/delete", {"keys": ["a.b"], "points": [1]}),
        ("post", "/collections/c/points", {"ids": [-1]}),
        ("post", "/collections/c/points", {"ids": list(range(10_001))}),
        ("post", "/collections/c/points/payload", '{"payload": {"a": NaN}, "points": [1]}'),
        ("post", "/collections/c/points/payload", {"payload": {"a": 1}, "points": []}),
        ("post", "/collections/c/points/payload", {"payload": {"a": 1}, "points": [1], "filter": {}}),
        ("post", "/collections/c/points/payload", {"payload": {"a": 1}, "points": [1], "key": "x"}),
        ("post", "/collections/c/points/payload", {"payload": {"a": 1}, "points": [1, 424242]}),  # unknown id
        ("post", "/collections/c/points/payload", '{"payload": {"\\udfff": 1}, "points": [1]}'),
        ("put", "/collections/c/points/payload", {"payload": [1], "points": [1]}),
        ("post", "/collections/c/points/payload/delete", {"keys": [], "points": [1]}),
        ("post", "/collections/c/points/payload/clear", {}),
        ("post", "/collections/c/points/count", {"filter": {"must": [{"has_id": [2**64]}]}}),
        ("put", "/collections/c/index", {"field_name": "", "field_schema": "keyword"}),
        ("put", "/collections/c/index", {"field_name": "n", "field_schema": "geo"}),
        ("delete", "/collections/c/index/never-declared", None),
        ("put", "/collections/c/points", {"batch": {"ids": [1, 2], "vectors": [ok]}}),
        ("put", "/collections/c/points", {"batch": {"ids": [1], "vectors": [ok]}, "points": []}),
        ("put", "/collections/c/points", {"points": [{"id": 1, "vector": {"image": ok}}]}),
        ("put", "/collections/c/points", {"points": [{"id": "5c56c793-69f3-4fbf-87e6", "vector": ok}]}),  # not a UUID
        ("put", "/collections/c/points", {"points": [{"id": 2**62, "vector": ok}]}),  # kept for UUIDs
        ("get", "/collections/c/points/not-a-uuid", None),
        ("get", "/collections/c/points/5c56c793-69f3-4fbf-87e6-c4bf54c28c26", None),  # never stored: 404
        ("post", "/collections/c/points/scroll", {"offset": "5c56c793-69f3-4fbf-87e6-c4bf54c28c26"}),
        ("post", "/collections/c/points/scroll", {"offset": "zz"}),
        ("post", "/collections/c/points/query", {"query": "5c56c793-69f3-4fbf-87e6-c4bf54c28c26"}),
        ("post", "/collections/c/points/query", {"query": "{not a uuid}"}),
        ("post", "/collections/c/points/recommend", {"positive": ["5c56c793-69f3-4fbf-87e6-c4bf54c28c26"]}),
        ("post", "/collections/c/points/payload", {"payload": {"a": 1}, "points": ["5c56c793-69f3-4fbf-87e6-c4bf54c28c26"]}),
        ("post", "/collections/c/points/count", {"filter": {"must": [{"has_id": ["x" * 46]}]}}),
        ("post", "/collections/c/points/delete", {"points": ["5c56c793"]}),
        ("post", "/collections/c/points/count",  # 120,000 ids in all: over the filter's 100,000
         {"filter": {"should": [{"has_id": list(range(k * 20_000, (k + 1) * 20_000))} for k in range(6)]}}),
        ("get", "/collections/c/points/4611686018427387904", None),
    ]


def test_new_routes_refuse_hostile_input_and_change_nothing(filled, vectors):
    before = probe(filled, vectors)
    for method, path, body in hostile_bodies(vectors[0]):
        if isinstance(body, str):
            r = filled.request(method.upper(), path, content=body, headers={"content-type": "application/json"})
        elif body is None:
            r = getattr(filled, method)(path)
        else:
            r = filled.request(method.upper(), path, json=body)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:300])
        assert len(r.json()["status"]["error"]) > 5, (path, r.text)
    assert filled.get("/collections/c/points/count").json()["result"]["count"] == 50
    assert filled.get("/collections/c/points/1").json()["result"]["payload"] == {"n": 1}
    assert probe(filled, vectors) == before


@pytest.mark.parametrize("body", [b'{"points": [', b'{"points": []} trailing', b'\xff\xfe{"points": []}',
                                  b'\xef\xbb\xbf{"points": []}', b'[' * 100_000 + b']' * 100_000,
                                  b'{"points": [{"id": 1, "vector": [' + b'1e400, ' * 49 + b'1e400]}]}',
                                  b'{"points": "\xc3\x28"}', b''])
def test_bodies_that_are_not_json_get_4xx(filled, vectors, body):
    """Bodies go through pydantic-core's JSON parser first (deps.JsonRequest), then the standard
    library's: whatever either refuses is a 4xx, and nothing changes."""
    before = probe(filled, vectors)
    r = filled.request("PUT", "/collections/c/points", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert filled.get("/collections/c/points/count").json()["result"]["count"] == 50
    assert probe(filled, vectors) == before
