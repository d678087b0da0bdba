"""Qdrant's named vectors: each name is a vector space of its own (model, index, training,
originals); ids and payloads are shared.  Through qdrant-client against a real `qinco serve`,
and through the engine for training, restart and records written before named vectors."""

import json
import signal
import sqlite3
import time

import httpx
import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from tests.server import free_port, serve

TEXT, IMAGE = 8, 4  # sizes of the two named vectors
RNG = np.random.default_rng(0)
T = RNG.normal(size=(60, TEXT)).astype(np.float32)
I = RNG.normal(size=(60, IMAGE)).astype(np.float32)


@pytest.fixture
def server(tmp_path):
    port = free_port()
    proc = serve(tmp_path, port, "--no-demo")
    yield f"http://127.0.0.1:{port}", proc, tmp_path
    proc.kill()
    proc.wait()


def restart(server):
    """kill -9 the server and start it again on the same data directory."""
    url, proc, data = server
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    port = int(url.rsplit(":", 1)[1])
    return serve(data, port, "--no-demo")


def create_two(client: QdrantClient, name="docs"):
    client.create_collection(name, vectors_config={
        "text": models.VectorParams(size=TEXT, distance=models.Distance.COSINE),
        "image": models.VectorParams(size=IMAGE, distance=models.Distance.EUCLID)})


def points(n=60):
    """Even ids have both vectors, odd ids only `text`; id 59 has none."""
    out = []
    for i in range(n):
        vector = {"text": T[i].tolist(), "image": I[i].tolist()} if i % 2 == 0 else {"text": T[i].tolist()}
        out.append(models.PointStruct(id=i, vector={} if i == n - 1 else vector, payload={"i": i}))
    return out


def test_named_vectors_through_qdrant_client(server):
    url, _, _ = server
    client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False)
    create_two(client)
    info = client.get_collection("docs")
    assert info.config.params.vectors == {
        "text": models.VectorParams(size=TEXT, distance=models.Distance.COSINE),
        "image": models.VectorParams(size=IMAGE, distance=models.Distance.EUCLID)}
    client.upsert("docs", points())
    assert client.count("docs").count == 60  # the point without vectors counts too

    hits = client.query_points("docs", query=T[10].tolist(), using="text", limit=3).points
    assert hits[0].id == 10 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    hits = client.query_points("docs", query=I[10].tolist(), using="image", limit=60).points
    assert hits[0].id == 10 and {h.id for h in hits} == set(range(0, 60, 2))  # only points with an image
    by_point = client.query_points("docs", query=12, using="image", limit=5).points
    assert 12 not in [h.id for h in by_point] and all(h.id % 2 == 0 for h in by_point)

    records = client.retrieve("docs", [2, 3, 59], with_vectors=True)
    got = {r.id: r.vector for r in records}
    assert set(got[2]) == {"text", "image"} and set(got[3]) == {"text"} and got[59] == {}
    assert np.allclose(got[2]["image"], I[2]) and np.allclose(got[2]["text"], T[2] / np.linalg.norm(T[2]))
    only = client.retrieve("docs", [2, 3], with_vectors=["image"])
    assert {r.id: set(r.vector) for r in only} == {2: {"image"}, 3: set()}
    page, _ = client.scroll("docs", limit=4, with_vectors=["text"])
    assert [p.id for p in page] == [0, 1, 2, 3] and all(set(p.vector) == {"text"} for p in page)

    # update_vectors: point 3 gets an image (its text stays); delete_vectors: point 4 loses its image
    client.update_vectors("docs", [models.PointVectors(id=3, vector={"image": I[0].tolist()})])
    client.delete_vectors("docs", vectors=["image"], points=[4])
    got = {r.id: r.vector for r in client.retrieve("docs", [3, 4], with_vectors=True)}
    assert set(got[3]) == {"text", "image"} and set(got[4]) == {"text"}
    assert client.retrieve("docs", [4], with_payload=True)[0].payload == {"i": 4}
    hits = client.query_points("docs", query=I[0].tolist(), using="image", limit=2).points
    assert {h.id for h in hits} == {0, 3}
    assert 4 not in {h.id for h in client.query_points("docs", query=I[4].tolist(), using="image", limit=60).points}
    # an upsert replaces the whole point: a vector it does not give goes
    client.upsert("docs", [models.PointStruct(id=6, vector={"text": T[6].tolist()}, payload={"i": 6})])
    assert set(client.retrieve("docs", [6], with_vectors=True)[0].vector) == {"text"}
    # the column form of an upsert, by name
    client.upsert("docs", models.Batch(ids=[100, 101], vectors={"text": T[:2].tolist(), "image": I[:2].tolist()}))
    assert client.query_points("docs", query=I[1].tolist(), using="image", limit=1).points[0].id in (1, 101)

    # deletes by filter, of vectors and of points
    client.delete_vectors("docs", vectors=["text"], points=models.Filter(must=[models.FieldCondition(
        key="i", range=models.Range(gte=50))]))
    text_ids = {h.id for h in client.query_points("docs", query=T[50].tolist(), using="text", limit=100).points}
    assert not text_ids & set(range(50, 60)) and 10 in text_ids
    client.delete("docs", [10])
    assert 10 not in {h.id for h in client.query_points("docs", query=T[10].tolist(), using="text", limit=5).points}


def test_named_vectors_survive_kill_9(server):
    url, _, _ = server
    client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False)
    create_two(client)
    client.upsert("docs", points())
    client.delete_vectors("docs", vectors=["image"], points=[2])
    client.update_vectors("docs", [models.PointVectors(id=1, vector={"image": I[1].tolist()})])
    proc = restart(server)
    try:
        assert client.count("docs").count == 60
        got = {r.id: r.vector for r in client.retrieve("docs", [1, 2, 59], with_vectors=True)}
        assert set(got[1]) == {"text", "image"} and set(got[2]) == {"text"} and got[59] == {}
        hits = client.query_points("docs", query=I[1].tolist(), using="image", limit=60).points
        assert hits[0].id == 1 and 2 not in {h.id for h in hits}
        assert client.get_collection("docs").config.params.vectors["image"].size == IMAGE
    finally:
        proc.kill()
        proc.wait()


def test_the_empty_name_is_the_unnamed_vector(server):
    """LangChain creates {"": params}, writes {"vector": {"": [...]}} and queries with using ""."""
    url, _, _ = server
    client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False)
    client.create_collection("lc", vectors_config={"": models.VectorParams(size=TEXT, distance=models.Distance.COSINE)})
    assert set(client.get_collection("lc").config.params.vectors) == {""}
    client.upsert("lc", [models.PointStruct(id=i, vector={"": T[i].tolist()}) for i in range(5)])
    client.upsert("lc", [models.PointStruct(id=5, vector=T[5].tolist())])  # a plain vector: the same one
    assert client.query_points("lc", query=T[5].tolist(), using="", limit=1).points[0].id == 5
    assert client.query_points("lc", query=T[3].tolist(), limit=1).points[0].id == 3
    record = client.retrieve("lc", [2], with_vectors=True)[0]
    assert isinstance(record.vector, list) and len(record.vector) == TEXT  # Qdrant's form for the unnamed one


@pytest.mark.parametrize("body, status, words", [
    ({"query": [0.0] * TEXT, "using": "nope"}, 400, "no vector named 'nope'"),
    ({"query": [0.0] * TEXT}, 400, "no unnamed vector"),
    ({"query": {"fusion": "rrf"}, "prefetch": [{"query": [0.0] * TEXT, "using": "text"}]}, 422, "'fusion' is not supported"),
    ({"prefetch": [{"query": [0.0] * TEXT, "using": "text"}], "query": [0.0] * TEXT}, 422, "prefetch is not supported"),
    ({"query": {"indices": [1], "values": [0.5]}, "using": "text"}, 422, "sparse vectors are not supported"),
    ({"query": [1.0] * IMAGE, "using": "text"}, 400, f"expected dim {TEXT}, got {IMAGE}"),
])
def test_unsupported_or_wrong_queries_get_a_clear_4xx(server, body, status, words):
    url, _, _ = server
    create_two(QdrantClient(url=url, prefer_grpc=False, check_compatibility=False))
    r = httpx.post(f"{url}/collections/docs/points/query", json=body)
    assert r.status_code == status and words in r.text, r.text


@pytest.mark.parametrize("method, path, body, status, words", [
    ("put", "/collections/s", {"vectors": {"a": {"size": 4, "distance": "Cosine"}},
                               "sparse_vectors": {"b": {}}}, 422, "sparse vectors are not supported"),
    ("put", "/collections/docs/points", {"points": [{"id": 1, "vector": {"text": {"indices": [0], "values": [1.0]}}}]},
     422, "sparse vectors are not supported"),
    ("put", "/collections/docs/points", {"points": [{"id": 1, "vector": {"sound": [1.0]}}]}, 400,
     "no vector named 'sound'"),
    ("put", "/collections/docs/points", {"points": [{"id": 1, "vector": [1.0] * TEXT}]}, 400, "no unnamed vector"),
    ("put", "/collections/docs/points/vectors", {"points": [{"id": 7, "vector": {"text": [1.0] * TEXT}}]}, 404,
     "no point with id 7"),
    ("post", "/collections/docs/points/vectors/delete", {"points": [1], "vector": ["sound"]}, 400,
     "no vector named 'sound'"),
    ("put", "/collections/many", {"vectors": {str(i): {"size": 4, "distance": "Cosine"} for i in range(17)}}, 422,
     "at most 16"),
])
def test_bad_named_vector_writes_change_nothing(server, method, path, body, status, words):
    url, _, _ = server
    client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False)
    create_two(client)
    client.upsert("docs", [models.PointStruct(id=1, vector={"text": T[1].tolist()})])
    r = getattr(httpx, method)(f"{url}{path}", json=body)
    assert r.status_code == status and words in r.text, r.text
    assert client.count("docs").count == 1
    assert set(client.retrieve("docs", [1], with_vectors=True)[0].vector) == {"text"}


def test_each_named_vector_trains_its_own_model(tmp_path, glove_sample):
    """One space trains and swaps while the other keeps collecting (exact search); after a
    restart each serves its own state."""
    from service.engine.registry import Store
    x = glove_sample[:1200]
    store = Store(tmp_path, train_threads=1)
    store.open_all()
    c = store.create("n", None, "balanced", qinco={"bytes": 4, "train_after": 0, "train_minutes": 0.05},
                     named={"g": {"size": 50, "metric": "l2"}, "s": {"size": IMAGE, "metric": "l2"}})
    vectors = [{"g": x[i], "s": I[i % 60]} if i < 60 else {"g": x[i]} for i in range(1200)]
    c.upsert(list(range(1200)), vectors, [None] * 1200)
    c.start_training(using="g")
    deadline = time.time() + 300
    while c.spaces["g"].job is not None and time.time() < deadline:
        time.sleep(0.2)
    g, s = c.qinco_status("g"), c.qinco_status("s")
    assert g["phase"] == "ready" and g["model"]["bytes"] == 4 and g["points_encoded"] == 1200, g
    assert s["phase"] == "collecting" and s["originals"] == 60
    info = c.info()
    assert info["vectors"]["g"]["bytes_per_vector"] == 5 and info["vectors"]["s"]["vectors_count"] == 60
    exhaustive = {"nprobe": c.spaces["g"].model.cfg.nlist, "nshort": 200}
    assert [h.id for h in c.search(x[7:8], 1, exhaustive, False, False, using="g")[0]] == [7]
    assert [h.id for h in c.search(I[7:8], 1, None, False, False, using="s")[0]] == [7]
    c.snapshot()
    c.upsert([5000], [{"g": x[3], "s": I[3]}], [None])  # after the snapshot: replayed
    store.close()
    store = Store(tmp_path)
    store.open_all()
    c = store.get("n")
    assert c.spaces["g"].generation == 1 and c.spaces["s"].collecting and c.count() == 1201
    assert c.spaces["g"].index.ntotal == 1201 and c.spaces["s"].index.ntotal == 61
    assert sorted(h.id for h in c.search(I[3:4], 2, None, False, False, using="s")[0]) == [3, 5000]
    store.close()


def test_a_record_written_before_named_vectors_opens_as_before(tmp_path, ivf_model, glove_sample):
    """Older collections kept codes in `points`, their settings at the top of collection.json, and
    their snapshot's codes inside index.faiss: they open with every point, payload and snapshot,
    and take writes."""
    from model.io import save_model
    from service.engine.registry import Store
    save_model(ivf_model, tmp_path / "m.safetensors")
    store = Store(tmp_path / "data")
    c = store.create("c", "l2", "fast", tmp_path / "m.safetensors")
    c.upsert(list(range(300)), glove_sample[:300], [{"i": i} for i in range(300)])
    c.snapshot()
    c.upsert(list(range(300, 320)), glove_sample[300:320], [{"i": i} for i in range(300, 320)])
    c.delete([0])
    expected = c.search(glove_sample[:20], 5, None, True, False)
    store.close()

    folder = tmp_path / "data" / "collections" / "c"
    db = sqlite3.connect(folder / "points.sqlite")  # back to the older layout
    db.executescript("""
        ALTER TABLE points ADD COLUMN codes BLOB NOT NULL DEFAULT x'';
        UPDATE points SET codes = (SELECT codes FROM codes WHERE codes.id = points.id);
        DROP TABLE codes;
    """)
    db.close()
    meta = json.loads((folder / "collection.json").read_text())
    space = meta.pop("vectors")[0]
    meta.pop("named")
    meta.update(metric=space["metric"], encoder=space["encoder"])
    (folder / "collection.json").write_text(json.dumps(meta))
    snapshot = json.loads((folder / "snapshot" / "snapshot.json").read_text())
    snapshot.update(snapshot.pop("spaces")[0])
    (folder / "snapshot" / "snapshot.json").write_text(json.dumps(snapshot))
    # ...and its snapshot kept the codes in faiss's own lists (no lists.npz)
    import faiss
    from model.lists import ListStore
    shell = faiss.read_index(str(folder / "snapshot" / "index.faiss"))
    lists = ListStore.load(folder / "snapshot" / "lists.npz", shell.nlist, shell.code_size)
    rows, list_nos, ids = lists.stored()
    listno = list_nos.astype("<i8").view(np.uint8).reshape(-1, 8)[:, :shell.coarse_code_size()]
    shell.add_sa_codes(np.ascontiguousarray(np.hstack([listno, lists.codes[rows]])), ids)
    faiss.write_index(shell, str(folder / "snapshot" / "index.faiss"))
    (folder / "snapshot" / "lists.npz").unlink()

    store = Store(tmp_path / "data")
    store.open_all()
    c = store.get("c")
    assert c.count() == 319 and c.recovery["snapshot_seq"] > 0 and c.recovery["replayed"] == 21
    got = c.search(glove_sample[:20], 5, None, True, False)
    assert [[(h.id, h.payload) for h in q] for q in got] == [[(h.id, h.payload) for h in q] for q in expected]
    c.upsert([1000], glove_sample[:1], [{"i": 1000}])
    assert c.search(glove_sample[:1], 1, {"nprobe": ivf_model.cfg.nlist}, True, False)[0][0].payload["i"] in (0, 1000)
    store.close()


def test_mmr_picks_diverse_hits_and_returns_the_vectors_asked_for(server):
    url, _, _ = server
    client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False)
    create_two(client)
    client.upsert("docs", points())
    q = {"using": "text", "limit": 5}
    plain = httpx.post(f"{url}/collections/docs/points/query", json={**q, "query": T[0].tolist()}).json()["result"]
    relevance_only = httpx.post(f"{url}/collections/docs/points/query", json={
        **q, "query": {"nearest": T[0].tolist(), "mmr": {"diversity": 0.0, "candidates_limit": 30}}}).json()["result"]
    assert [h["id"] for h in relevance_only["points"]] == [h["id"] for h in plain["points"]]
    r = httpx.post(f"{url}/collections/docs/points/query", json={
        **q, "query": {"nearest": T[0].tolist(), "mmr": {"diversity": 0.9, "candidates_limit": 30}},
        "with_vector": ["image"]})
    hits = r.json()["result"]["points"]
    assert r.status_code == 200 and hits[0]["id"] == 0 and len(hits) == 5
    assert [h["id"] for h in hits] != [h["id"] for h in plain["points"]]  # diversity changes the picks
    assert all(set(h["vector"]) == ({"image"} if h["id"] % 2 == 0 and h["id"] != 59 else set()) for h in hits)
    for body, words in [({"with_vector": ["zz"]}, "no vector named 'zz'"),
                        ({"query": {"nearest": T[0].tolist(), "mmr": {"candidates_limit": 5000}}}, "candidates_limit")]:
        r = httpx.post(f"{url}/collections/docs/points/query", json={
            **q, "query": {"nearest": T[0].tolist(), "mmr": {}}, **body})
        assert r.status_code == 400 and words in r.text, r.text


def test_repeated_ids_and_large_vector_reads(server):
    url, _, _ = server
    client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False)
    create_two(client)
    client.upsert("docs", points())
    r = httpx.post(f"{url}/collections/docs/points/vectors/delete", json={"points": [2, 2], "vector": ["image"]})
    assert r.status_code == 200 and set(client.retrieve("docs", [2], with_vectors=True)[0].vector) == {"text"}
    page, nxt = client.scroll("docs", limit=10_000, with_vectors=True)  # a page of at most max_limit points
    assert len(page) == 60 and nxt is None
