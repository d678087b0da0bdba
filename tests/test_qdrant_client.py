"""The official qdrant-client (REST), unchanged, against a real `qinco serve`."""

import asyncio
import uuid

import httpx
import pytest

from tests.server import free_port, serve, wait_green

qdrant_client = pytest.importorskip("qdrant_client")
from qdrant_client import AsyncQdrantClient, QdrantClient, models  # noqa: E402


@pytest.fixture
def server(data_dir):
    port = free_port()
    proc = serve(data_dir, port, "--no-demo")
    url = f"http://127.0.0.1:{port}"
    httpx.put(f"{url}/collections/c", json={"model": "models/ivf.safetensors", "metric": "cosine"},
              timeout=60).raise_for_status()
    yield url
    proc.kill()
    proc.wait()


def test_everyday_calls(server, vectors):
    client = QdrantClient(url=server, prefer_grpc=False, check_compatibility=False)
    assert [c.name for c in client.get_collections().collections] == ["c"]
    assert client.collection_exists("c") and not client.collection_exists("nope")
    info = client.get_collection("c")
    assert info.status == models.CollectionStatus.GREEN and info.config.params.vectors.size == 50
    assert info.config.params.vectors.distance == models.Distance.COSINE

    client.upsert("c", [models.PointStruct(id=i, vector=vectors[i].tolist(), payload={"n": i, "tag": f"t{i % 3}"})
                        for i in range(40)])
    client.upsert("c", models.Batch(ids=[40, 41], vectors=vectors[40:42].tolist(),
                                    payloads=[{"n": 40, "tag": "t1"}, {"n": 41, "tag": "t2"}]))
    wait_green(client, "c")
    assert client.count("c", exact=True).count == 42
    assert client.count("c", count_filter=models.Filter(must=[models.FieldCondition(
        key="tag", match=models.MatchValue(value="t0"))])).count == 14

    records = client.retrieve("c", [3, 41, 999], with_vectors=True)
    assert sorted(r.id for r in records) == [3, 41] and all(len(r.vector) == 50 for r in records)
    assert {r.id: r.payload["n"] for r in records} == {3: 3, 41: 41}

    seen, offset = [], None
    tagged = models.Filter(must=[models.FieldCondition(key="tag", match=models.MatchValue(value="t1"))])
    while True:
        page, offset = client.scroll("c", scroll_filter=tagged, limit=5, offset=offset)
        seen += [p.id for p in page]
        if offset is None:
            break
    assert seen == [i for i in range(42) if i % 3 == 1 or i == 40] and seen == sorted(seen)

    hits = client.query_points("c", query=vectors[7].tolist(), limit=5, with_payload=True).points
    assert hits[0].id == 7 and hits[0].payload["n"] == 7 and hits[0].score > 0.5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    filtered = client.query_points("c", query=vectors[7].tolist(), query_filter=tagged, limit=3,
                                   search_params=models.SearchParams(hnsw_ef=64), with_payload=True).points
    assert filtered and all(h.payload["tag"] == "t1" for h in filtered)
    page2 = client.query_points("c", query=vectors[7].tolist(), limit=3, offset=2).points
    assert [h.id for h in page2] == [h.id for h in hits[2:5]]
    above = client.query_points("c", query=vectors[7].tolist(), limit=10, score_threshold=hits[1].score).points
    assert [h.id for h in above] == [h.id for h in hits[:2]]
    by_id = client.query_points("c", query=7, limit=3).points
    assert 7 not in [h.id for h in by_id] and len(by_id) == 3
    batch = client.query_batch_points("c", [models.QueryRequest(query=vectors[i].tolist(), limit=1) for i in (1, 2)])
    assert [b.points[0].id for b in batch] == [1, 2]
    listed = client.query_points("c", limit=3, offset=1, with_payload=True).points  # no query: by id, as Qdrant
    assert [p.id for p in listed] == [1, 2, 3] and {p.score for p in listed} == {0.0} and listed[0].payload["n"] == 1
    assert [p.id for p in client.query_points("c", query_filter=tagged, limit=2).points] == seen[:2]
    mixed = client.query_batch_points("c", [models.QueryRequest(query=7, limit=2), models.QueryRequest(limit=1),
                                            models.QueryRequest(query=8, limit=2)])
    assert [p.id for p in mixed[0].points] == [h.id for h in by_id[:2]] and mixed[1].points[0].id == 0
    assert 8 not in [p.id for p in mixed[2].points]

    client.set_payload("c", {"extra": True}, points=[1, 2])
    client.overwrite_payload("c", {"only": 1}, points=[3])
    client.delete_payload("c", ["tag"], points=[1])
    client.clear_payload("c", points_selector=[4])
    got = {r.id: r.payload for r in client.retrieve("c", [1, 2, 3, 4])}
    assert got[1] == {"n": 1, "extra": True} and got[2] == {"n": 2, "tag": "t2", "extra": True}
    assert got[3] == {"only": 1} and got[4] is None
    client.set_payload("c", {"flag": "x"}, points=models.FilterSelector(filter=tagged))
    assert client.count("c", count_filter=models.Filter(must=[models.FieldCondition(
        key="flag", match=models.MatchValue(value="x"))])).count == client.count("c", count_filter=tagged).count

    client.create_payload_index("c", "tag", models.PayloadSchemaType.KEYWORD)
    assert client.get_collection("c").payload_schema["tag"].data_type == models.PayloadSchemaType.KEYWORD
    client.delete("c", points_selector=models.PointIdsList(points=[5, 6]))
    still_tagged = client.count("c", count_filter=tagged).count
    assert still_tagged == len(seen) - 2  # 1 lost its tag, 4 its whole payload
    client.delete("c", points_selector=models.FilterSelector(filter=tagged))
    assert client.count("c").count == 42 - 2 - still_tagged
    assert client.delete_collection("c") and not client.collection_exists("c")


def test_unsupported_calls_get_a_clear_4xx(server, vectors):
    client = QdrantClient(url=server, prefer_grpc=False, check_compatibility=False)
    for call in (lambda: client.upsert("c", [models.PointStruct(id="5c56c793-69f3-4fbf-87e6",  # not a UUID
                                                                vector=vectors[0].tolist())]),
                 lambda: client.query_points("c", query=vectors[0].tolist(), using="image"),
                 lambda: client.upsert("c", [models.PointStruct(id=1, vector={"image": vectors[0].tolist()})])):
        with pytest.raises(qdrant_client.http.exceptions.UnexpectedResponse) as e:
            call()
        assert 400 <= e.value.status_code < 500 and b"error" in e.value.content


def test_uuid_ids(data_dir, vectors):
    """UUID ids next to integer ones, in every call that takes or returns an id, and after a restart."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(data_dir, port, "--no-demo")
    try:
        httpx.put(f"{url}/collections/c", json={"model": "models/ivf.safetensors"}, timeout=60).raise_for_status()
        client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False)
        uuids = [str(uuid.UUID(int=(i + 1) * 7919 + (1 << 100))) for i in range(20)]
        client.upsert("c", [models.PointStruct(id=uuids[i], vector=vectors[i].tolist(), payload={"n": i})
                            for i in range(10)])
        client.upsert("c", models.Batch(ids=uuids[10:20], vectors=vectors[10:20].tolist(),
                                        payloads=[{"n": i} for i in range(10, 20)]))
        client.upsert("c", [models.PointStruct(id=i, vector=vectors[i].tolist(), payload={"n": i}) for i in range(20, 25)])
        # The same UUID written another way (upper case, no hyphens) is the same point.
        client.upsert("c", [models.PointStruct(id=uuid.UUID(uuids[3]).hex.upper(), vector=vectors[3].tolist(),
                                               payload={"n": 3, "again": True})])
        assert client.count("c").count == 25
        wait_green(client, "c")

        hits = client.query_points("c", query=vectors[4].tolist(), limit=3, with_payload=True).points
        assert hits[0].id == uuids[4] and hits[0].payload == {"n": 4}
        assert client.query_points("c", query=vectors[22].tolist(), limit=1).points[0].id == 22
        by_uuid = client.query_points("c", query=uuids[4], limit=3).points
        assert uuids[4] not in [h.id for h in by_uuid] and len(by_uuid) == 3
        got = client.retrieve("c", [uuids[3], 21, str(uuid.uuid4())], with_vectors=True)
        assert {r.id: r.payload["n"] for r in got} == {uuids[3]: 3, 21: 21} and len(got[0].vector) == 50
        assert next(r for r in got if r.id == uuids[3]).payload["again"] is True
        ids = [uuids[5], 20]
        assert client.count("c", count_filter=models.Filter(must=[models.HasIdCondition(has_id=ids)])).count == 2
        seen, offset = [], None
        while True:
            page, offset = client.scroll("c", limit=7, offset=offset)
            seen += [p.id for p in page]
            if offset is None:
                break
        assert seen == list(range(20, 25)) + uuids  # integers first, then UUIDs in the order first seen
        client.set_payload("c", {"flag": 1}, points=[uuids[6]])
        assert client.retrieve("c", [uuids[6]])[0].payload == {"n": 6, "flag": 1}
        with pytest.raises(qdrant_client.http.exceptions.UnexpectedResponse) as e:
            client.set_payload("c", {"flag": 1}, points=[str(uuid.uuid4())])
        assert e.value.status_code == 404
        client.delete("c", points_selector=models.PointIdsList(points=[uuids[0], 21]))
        assert client.count("c").count == 23
        r = httpx.get(f"{url}/collections/c/points/{uuids[1].upper()}")
        assert r.status_code == 200 and r.json()["result"]["id"] == uuids[1]
        assert httpx.get(f"{url}/collections/c/points/{uuids[0]}").status_code == 404
    finally:
        proc.kill()
        proc.wait()
    proc = serve(data_dir, port, "--no-demo")  # the ids survive a kill -9 and a restart
    try:
        client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False)
        assert client.count("c").count == 23
        wait_green(client, "c")
        hits = client.query_points("c", query=vectors[9].tolist(), limit=1).points
        assert hits[0].id == uuids[9]
        client.upsert("c", [models.PointStruct(id=uuids[0], vector=vectors[0].tolist())])  # deleted, back again
        wait_green(client, "c")
        assert client.query_points("c", query=vectors[0].tolist(), limit=1).points[0].id == uuids[0]
        fresh = str(uuid.uuid4())
        client.upsert("c", [models.PointStruct(id=fresh, vector=vectors[30].tolist())])
        assert client.retrieve("c", [fresh])[0].id == fresh and client.count("c").count == 25
    finally:
        proc.kill()
        proc.wait()


def test_async_client(server, vectors):
    async def run():
        client = AsyncQdrantClient(url=server, prefer_grpc=False, check_compatibility=False)
        await client.upsert("c", [models.PointStruct(id=i, vector=vectors[i].tolist(), payload={"n": i})
                                  for i in range(10)])
        while (await client.get_collection("c")).status != models.CollectionStatus.GREEN:  # see wait_green
            await asyncio.sleep(0.05)
        hits = (await client.query_points("c", query=vectors[4].tolist(), limit=2)).points
        count = (await client.count("c")).count
        await client.close()
        return hits, count

    hits, count = asyncio.run(run())
    assert hits[0].id == 4 and count == 10


def test_create_collection_by_vector_params(server, glove_sample):
    """Qdrant's own create call: the collection searches exactly at once, then trains its model."""
    client = QdrantClient(url=server, prefer_grpc=False, check_compatibility=False)
    assert client.create_collection("own", vectors_config=models.VectorParams(size=50, distance=models.Distance.EUCLID))
    info = client.get_collection("own")
    assert info.status == models.CollectionStatus.GREY and info.config.params.vectors.distance == models.Distance.EUCLID
    client.upsert("own", models.Batch(ids=list(range(300)), vectors=glove_sample[:300].tolist()))
    hits = client.query_points("own", query=glove_sample[7].tolist(), limit=3).points
    assert hits[0].id == 7 and hits[0].score < 1e-3  # exact before a model exists: distance 0 to itself
    with pytest.raises(qdrant_client.http.exceptions.UnexpectedResponse) as e:
        client.create_collection("dot", vectors_config=models.VectorParams(size=50, distance=models.Distance.DOT))
    assert e.value.status_code == 422 and b"not supported" in e.value.content


def test_uuids_next_to_integer_ids_written_by_older_versions(tmp_path, ivf_model, glove_sample):
    """Integer ids at or above 2^62 (allowed before UUIDs) stay integers; new UUIDs are numbered past them."""
    import sqlite3

    from model.io import save_model
    from service.engine.ids import UUID_BASE
    from service.engine.registry import Store
    save_model(ivf_model, tmp_path / "m.safetensors")
    store = Store(tmp_path / "data")
    c = store.create("c", "l2", "fast", tmp_path / "m.safetensors")
    c.upsert([1, 2], glove_sample[:2], [None, {"old": True}])
    store.close()
    db = sqlite3.connect(tmp_path / "data" / "collections" / "c" / "points.sqlite")
    for table in ("points", "codes"):  # as an older version could have
        db.execute(f"UPDATE {table} SET id = ? WHERE id = 2", (UUID_BASE + 5,))
    db.commit()
    db.close()
    store = Store(tmp_path / "data")
    store.open_all()
    c = store.get("c")
    u = str(uuid.uuid4())
    c.upsert([u], glove_sample[2:3], [{"new": True}])
    assert c.count() == 3
    hits = c.search(glove_sample[1:3], 1, None, True, False)
    assert hits[0][0].id == UUID_BASE + 5 and hits[0][0].payload == {"old": True}
    assert hits[1][0].id == u and hits[1][0].payload == {"new": True}
    assert [r["id"] for r in c.records([u, 1], True, False)] == [u, 1]
    store.close()
