"""Route tests through the real app (TestClient runs the ASGI app in-process)."""

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.index import QincoIndex
from model.io import save_model
from model.network import Encoder
from service.http.app import create_app
from service.settings import Settings
from tests.conftest import random_model
from model.network import QincoConfig

D = 50


def wait_ready(client, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(client.get("/readyz").json())


def make_client(data_dir, **kw):
    settings = Settings(data_dir=data_dir, **{"demo": False, **kw})
    return TestClient(create_app(settings))


@pytest.fixture
def client(data_dir):
    with make_client(data_dir) as c:
        wait_ready(c)
        yield c


def create(client, name="c", **body):
    body = {"model": "models/ivf.safetensors", **body}
    r = client.put(f"/collections/{name}", json=body)
    assert r.status_code == 200 and r.json()["result"] is True, r.text  # Qdrant answers true
    return client.get(f"/collections/{name}").json()["result"]


def upsert(client, vectors, ids, name="c", payload=True, settle=True):
    """Then, with `settle`, wait until the background refinement (fast ingest) has re-encoded the
    points, so that what a test compares afterwards does not change under it."""
    points = [{"id": int(i), "vector": v.tolist(), **({"payload": {"n": int(i)}} if payload else {})}
              for i, v in zip(ids, vectors)]
    r = client.put(f"/collections/{name}/points", json={"points": points})
    assert r.status_code == 200, r.text
    deadline = time.time() + 60
    while settle and client.get(f"/collections/{name}").json()["result"]["qinco"]["refine_pending"]:
        assert time.time() < deadline, "the background refinement did not finish"
        time.sleep(0.02)
    return r.json()["result"]


def test_health_ready_metrics_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    client.get("/collections")
    text = client.get("/metrics").text
    assert "qinco_requests_total" in text and 'route="/collections"' in text
    spec = client.get("/openapi.json").json()
    assert "/collections/{name}/points/search" in spec["paths"]


def test_collection_lifecycle(client):
    info = create(client)
    assert info["dimension"] == D and info["points_count"] == 0 and info["metric"] == "l2"
    assert info["bytes_per_vector"] == 3 and info["nlist"] == 16
    assert client.get("/collections").json()["result"]["collections"] == [{"name": "c"}]
    assert client.get("/collections/c").json()["result"]["name"] == "c"
    assert client.delete("/collections/c").status_code == 200
    assert client.get("/collections/c").status_code == 404
    create(client)  # the name is free again


def test_upsert_search_get_count_delete(client, vectors):
    create(client)
    ids = np.arange(len(vectors)) * 2 + 1
    res = upsert(client, vectors, ids)
    assert res["count"] == len(vectors) and res["status"] == "completed"
    assert client.get("/collections/c/points/count").json()["result"]["count"] == len(vectors)
    r = client.post("/collections/c/points/search", json={"vector": vectors[3].tolist(), "limit": 5, "with_payload": True})
    hits = r.json()["result"]
    assert len(hits) == 5 and hits[0]["id"] == 7 and hits[0]["payload"] == {"n": 7}
    assert [h["score"] for h in hits] == sorted(h["score"] for h in hits)  # l2: distance, ascending
    r = client.post("/collections/c/points/search",
                    json={"vector": vectors[3].tolist(), "limit": 3, "with_payload": False, "with_vector": True,
                          "params": {"nprobe": 4, "nshort": 50}})
    hit = r.json()["result"][0]
    assert "payload" not in hit and len(hit["vector"]) == D
    r = client.post("/collections/c/points/search",  # nshort 0: fixed tables alone, no neural re-ranking
                    json={"vector": vectors[3].tolist(), "limit": 3, "params": {"nprobe": 16, "nshort": 0}})
    assert r.status_code == 200 and len(r.json()["result"]) == 3
    batch = client.post("/collections/c/points/search/batch",
                        json={"searches": [{"vector": vectors[i].tolist(), "limit": 2} for i in range(20)]})
    found = [hs[0]["id"] for hs in batch.json()["result"]]
    assert np.mean(np.array(found) == ids[:20]) > 0.8
    point = client.get("/collections/c/points/7?with_vector=true").json()["result"]
    assert point["payload"] == {"n": 7} and len(point["vector"]) == D
    assert client.get("/collections/c/points/8").status_code == 404
    rec = client.post("/collections/c/points/recommend", json={"positive": [7], "limit": 4}).json()["result"]
    assert len(rec) == 4 and 7 not in [h["id"] for h in rec]
    r = client.post("/collections/c/points/delete", json={"points": [7, 9, 100000]})
    assert r.json()["result"]["count"] == 2
    assert client.get("/collections/c/points/count").json()["result"]["count"] == len(vectors) - 2
    r = client.post("/collections/c/points/search", json={"vector": vectors[3].tolist(), "limit": 10})
    assert 7 not in [h["id"] for h in r.json()["result"]]


def test_upsert_replaces_payload_and_vector(client, vectors):
    create(client)
    upsert(client, vectors[:10], range(10))
    client.put("/collections/c/points", json={"points": [{"id": 3, "vector": vectors[50].tolist(),
                                                          "payload": {"new": True}}]})
    assert client.get("/collections/c/points/count").json()["result"]["count"] == 10
    assert client.get("/collections/c/points/3").json()["result"]["payload"] == {"new": True}
    hit = client.post("/collections/c/points/search", json={"vector": vectors[50].tolist(), "limit": 1})
    assert hit.json()["result"][0]["id"] == 3


def test_cosine_collection_scores_similarity(client, vectors):
    create(client, "cos", metric="cosine")
    upsert(client, vectors[:100] * 7.0, range(100), name="cos")  # scale does not matter for cosine
    hits = client.post("/collections/cos/points/search", json={"vector": (vectors[5] * 0.1).tolist(),
                                                              "limit": 5}).json()["result"]
    assert hits[0]["id"] == 5 and 0.5 < hits[0]["score"] <= 1.0001  # 2-byte codes: a coarse copy
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_create_from_index_directory(client, data_dir, ivf_model, vectors):
    index = QincoIndex(ivf_model)
    index.add(vectors[:100], np.arange(100) + 1000, Encoder(16, 2))
    index.save(data_dir / "indexes" / "prebuilt")
    assert client.put("/collections/pre", json={"index": "indexes/prebuilt"}).json()["result"] is True
    assert client.get("/collections/pre").json()["result"]["points_count"] == 100
    hit = client.post("/collections/pre/points/search", json={"vector": vectors[4].tolist(), "limit": 1})
    assert hit.json()["result"][0]["id"] == 1004
    assert client.get("/collections/pre/points/1004").json()["result"]["payload"] is None


def test_restart_keeps_everything(data_dir, vectors):
    with make_client(data_dir, snapshot_every=150) as c:
        wait_ready(c)
        create(c)
        upsert(c, vectors[:100], range(100))
        upsert(c, vectors[100:200], range(100, 200))  # crosses snapshot_every: a snapshot is written
        deadline = time.time() + 10
        while not (data_dir / "collections" / "c" / "snapshot" / "snapshot.json").exists():
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
        upsert(c, vectors[200:250], range(200, 250))  # after the snapshot
        c.post("/collections/c/points/delete", json={"points": [0, 1, 150]})
        before = c.post("/collections/c/points/search/batch",
                        json={"searches": [{"vector": v.tolist(), "limit": 5} for v in vectors[:30]]}).json()
    with make_client(data_dir) as c:
        wait_ready(c)
        assert c.get("/collections/c/points/count").json()["result"]["count"] == 247
        after = c.post("/collections/c/points/search/batch",
                       json={"searches": [{"vector": v.tolist(), "limit": 5} for v in vectors[:30]]}).json()
        assert before["result"] == after["result"]
        assert c.get("/collections/c/points/0").status_code == 404
        assert c.get("/collections/c/points/249").json()["result"]["payload"] == {"n": 249}


def test_api_key(data_dir):
    with make_client(data_dir, api_key="s3cret") as c:
        wait_ready(c)
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        r = c.get("/collections")
        assert r.status_code == 401 and "API key" in r.json()["status"]["error"]
        assert c.get("/collections", headers={"api-key": "wrong"}).status_code == 401
        assert c.get("/collections", headers={"api-key": "s3cret"}).status_code == 200
        assert c.get("/collections", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def good_point(v, i=1):
    return {"id": i, "vector": v.tolist()}


def bad_requests(v):
    """(method, path, body) requests that must all get a 4xx and change nothing."""
    ok = v.tolist()
    nan_json = json.dumps({"points": [{"id": 1, "vector": ok}]}).replace(str(ok[0]), "NaN", 1)
    inf_json = json.dumps({"vector": ok, "limit": 3}).replace(str(ok[1]), "Infinity", 1)
    return [
        ("put", "/collections/c/points", {"points": [{"id": 1, "vector": ok[:40]}]}),  # wrong dim
        ("put", "/collections/c/points", {"points": [{"id": 1, "vector": ok + [0.0]}]}),
        ("put", "/collections/c/points", nan_json),
        ("put", "/collections/c/points", {"points": []}),
        ("put", "/collections/c/points", {"points": [good_point(v, 5), good_point(v, 5)]}),  # duplicate ids
        ("put", "/collections/c/points", {"points": [{"id": -1, "vector": ok}]}),
        ("put", "/collections/c/points", {"points": [{"id": 1.5, "vector": ok}]}),
        ("put", "/collections/c/points", {"points": [{"id": "7", "vector": ok}]}),
        ("put", "/collections/c/points", {"points": [{"id": 2**64, "vector": ok}]}),
        ("put", "/collections/c/points", {"points": [{"id": 1}]}),
        ("put", "/collections/c/points", {"points": [{"id": 1, "vector": []}]}),
        ("put", "/collections/c/points", {"points": [{"id": 1, "vector": ["a"] * 50}]}),
        ("put", "/collections/c/points", {"points": [{"id": 1, "vector": ok, "payload": [1, 2]}]}),
        ("put", "/collections/c/points", {"points": [{"id": 1, "vector": ok, "extra": 1}]}),
        ("put", "/collections/c/points", {"pts": []}),
        ("put", "/collections/c/points", "{not json"),
        ("put", "/collections/c/points", [1, 2, 3]),
        ("put", "/collections/c/points", {"points": [good_point(v, i) for i in range(20001)]}),  # over max_batch
        ("put", "/collections/nope/points", {"points": [good_point(v)]}),
        ("post", "/collections/c/points/search", {"vector": ok[:10]}),
        ("post", "/collections/c/points/search", inf_json),
        ("post", "/collections/c/points/search", {"vector": ok, "limit": 0}),
        ("post", "/collections/c/points/search", {"vector": ok, "limit": -3}),
        ("post", "/collections/c/points/search", {"vector": ok, "limit": 10**6}),
        ("post", "/collections/c/points/search", {"vector": ok, "params": {"nprobe": 0}}),
        ("post", "/collections/c/points/search", {"vector": ok, "params": {"nprobe": 17}}),  # > nlist
        ("post", "/collections/c/points/search", {"vector": ok, "params": {"nshort": -1}}),
        ("post", "/collections/c/points/search", {"vector": ok, "params": {"bogus": 1}}),
        ("post", "/collections/c/points/search", {"vector": ok, "params": {"target_recall": 1.5}}),
        ("post", "/collections/c/points/search", {"vector": ok, "params": {"target_recall": 0.9}}),  # untuned
        ("post", "/collections/c/points/search", {"vector": ok, "params": {"nprobe": 2, "target_recall": 0.9}}),
        ("post", "/collections/c/points/search", {"vector": [0.0] * 50, "limit": 2, "unknown": True}),
        ("post", "/collections/c/points/search", {}),
        ("post", "/collections/nope/points/search", {"vector": ok}),
        ("post", "/collections/c/points/search/batch", {"searches": []}),
        ("post", "/collections/c/points/search/batch", {"searches": [{"vector": ok[:3]}]}),
        ("post", "/collections/c/points/delete", {"points": []}),
        ("post", "/collections/c/points/delete", {"points": ["x"]}),
        ("post", "/collections/c/points/delete", {"points": [-5]}),
        ("post", "/collections/c/points/recommend", {"positive": [999999]}),
        ("post", "/collections/c/points/recommend", {"positive": []}),
        ("get", "/collections/c/points/abc", None),
        ("get", "/collections/c/points/424242", None),
        ("get", "/collections/nope", None),
        ("delete", "/collections/nope", None),
        ("put", "/collections/c", {"model": "models/ivf.safetensors"}),  # exists: 409
        ("put", "/collections/x", {"model": "../../etc/passwd"}),  # leaves the data dir
        ("put", "/collections/x", {"model": "/etc/passwd"}),
        ("put", "/collections/x", {"model": "models/missing.safetensors"}),
        ("put", "/collections/x", {"model": "models/plain.safetensors"}),  # not an IVF model
        ("put", "/collections/x", {"model": "models/ivf.safetensors", "index": "y"}),
        ("put", "/collections/x", {}),
        ("put", "/collections/x", {"model": "models/ivf.safetensors", "metric": "dot"}),
        ("put", "/collections/bad..name", {"model": "models/ivf.safetensors"}),
        ("put", "/collections/" + "n" * 65, {"model": "models/ivf.safetensors"}),
    ]


def test_bad_requests_get_4xx_with_a_message_and_change_nothing(client, data_dir, vectors):
    save_model(random_model(QincoConfig(d=D, M=2, K=16)), data_dir / "models" / "plain.safetensors")
    create(client)
    upsert(client, vectors[:50], range(50))
    probe = {"searches": [{"vector": v.tolist(), "limit": 5} for v in vectors[:10]]}
    before = client.post("/collections/c/points/search/batch", json=probe).json()["result"]
    corpus = bad_requests(vectors[0])
    assert len(corpus) >= 40
    for method, path, body in corpus:
        kwargs = {"content": body} if isinstance(body, str) else {"json": body} if body is not None else {}
        if isinstance(body, str):
            kwargs["headers"] = {"content-type": "application/json"}
        r = getattr(client, method)(path, **kwargs) if body is not None else getattr(client, method)(path)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:200])
        message = r.json()["status"]["error"]
        assert isinstance(message, str) and len(message) > 5, (path, message)
    assert client.get("/collections/c/points/count").json()["result"]["count"] == 50
    assert client.post("/collections/c/points/search/batch", json=probe).json()["result"] == before
    assert client.get("/collections").json()["result"]["collections"] == [{"name": "c"}]


def test_clear_messages(client, vectors):
    create(client)
    r = client.put("/collections/c/points", json={"points": [{"id": 1, "vector": vectors[0][:30].tolist()}]})
    assert r.status_code == 400 and r.json()["status"]["error"] == "expected dim 50, got 30"
    r = client.get("/collections/zzz")
    assert r.status_code == 404 and "zzz" in r.json()["status"]["error"]
    r = client.put("/collections/c", json={"model": "models/ivf.safetensors"})
    assert r.status_code == 409 and "already exists" in r.json()["status"]["error"]


def test_oversized_body_gets_413(data_dir, vectors):
    with make_client(data_dir, max_body_bytes=4096) as c:
        wait_ready(c)
        create(c)
        points = [good_point(vectors[0], i) for i in range(20)]
        r = c.put("/collections/c/points", json={"points": points})
        assert r.status_code == 413 and "4096" in r.json()["status"]["error"]
        assert c.get("/collections/c/points/count").json()["result"]["count"] == 0
