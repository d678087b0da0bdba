"""Payload filters: Qdrant's semantics against a plain reference, and filtered search against brute force."""

import random

import numpy as np
import pytest

from model.index import QincoIndex, SearchParams
from model.network import decode
from service.engine.filters import Evaluator, FieldIndex
from service.engine.registry import Store
from service.http import schemas
from tests.test_service import create, make_client, wait_ready

# ---- a reference written from Qdrant's documentation, independent of service/engine/filters.py ------

def ref_values(payload, key):
    """Values at a dotted key, arrays flattened at every level."""
    values = [payload]
    for part in key.replace("[]", "").split("."):
        nxt = []
        for v in values:
            for item in (v if isinstance(v, list) else [v]):
                if isinstance(item, dict) and part in item:
                    nxt.append(item[part])
        values = nxt
    flat = []
    for v in values:
        flat += v if isinstance(v, list) else [v]
    return flat


def same(a, b):
    return type(a) is type(b) and a == b


def ref_field(payload, c):
    values = ref_values(payload, c["key"])
    if "match" in c:
        m = c["match"]
        if "value" in m:
            return any(same(v, m["value"]) for v in values)
        if "any" in m:
            return any(any(same(v, x) for x in m["any"]) for v in values)
        if "except" in m:
            return any(v is not None and not any(same(v, x) for x in m["except"]) for v in values)
        if "text" in m:
            return any(isinstance(v, str) and m["text"] in v for v in values)
    if "range" in c:
        r = c["range"]
        return any(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and ("gt" not in r or v > r["gt"]) and ("gte" not in r or v >= r["gte"])
                   and ("lt" not in r or v < r["lt"]) and ("lte" not in r or v <= r["lte"]) for v in values)
    r, n = c["values_count"], sum(v is not None for v in values)  # nulls are not counted
    return (("gt" not in r or n > r["gt"]) and ("gte" not in r or n >= r["gte"])
            and ("lt" not in r or n < r["lt"]) and ("lte" not in r or n <= r["lte"]))


def ref_stored(payload, key):
    """The values stored at a key (arrays flattened before the last step only)."""
    key = key.replace("[]", "")
    parent = ref_values(payload, key.rsplit(".", 1)[0]) if "." in key else [payload]
    last = key.rsplit(".", 1)[-1]
    return [v[last] for v in parent if isinstance(v, dict) and last in v]


def ref_condition(pid, payload, c):
    if "has_id" in c:
        return pid in c["has_id"]
    if "is_empty" in c:  # missing, null or []; [null] is not empty
        return all(v is None or v == [] for v in ref_stored(payload, c["is_empty"]["key"]))
    if "is_null" in c:
        return any(v is None for v in ref_stored(payload, c["is_null"]["key"]))
    if "key" in c:
        return ref_field(payload, c)
    return ref_filter(pid, payload, c)


def listed(x):
    return [] if x is None else x if isinstance(x, list) else [x]


def ref_filter(pid, payload, f):
    ok = all(ref_condition(pid, payload, c) for c in listed(f.get("must")))
    if listed(f.get("should")):
        ok = ok and any(ref_condition(pid, payload, c) for c in listed(f.get("should")))
    ok = ok and not any(ref_condition(pid, payload, c) for c in listed(f.get("must_not")))
    if "min_should" in f:
        hits = sum(ref_condition(pid, payload, c) for c in f["min_should"]["conditions"])
        ok = ok and hits >= f["min_should"]["min_count"]
    return ok


# ---- random payloads and filters -------------------------------------------------------------

COLOURS = ["red", "green", "blue", "black"]


def random_payload(rng: random.Random):
    p = {}
    if rng.random() < 0.8:
        p["colour"] = rng.choice(COLOURS + [None, ["red", "blue"], [], [None], 3, True])
    if rng.random() < 0.8:
        p["n"] = rng.choice([rng.randint(-5, 5), rng.uniform(-5, 5), [1, 2, 7], None, "4", False])
    if rng.random() < 0.6:
        p["city"] = rng.choice([{"name": rng.choice(["Paris", "Lyon"]), "pop": rng.randint(1, 9)},
                                [{"name": "Nice", "pop": 3}, {"name": "Paris", "pop": 8}], {"name": None},
                                [{"name": "Lyon"}, {"name": None, "pop": 2.5}]])
    if rng.random() < 0.3:
        p["flag"] = rng.choice([True, False])
    return p if p or rng.random() < 0.5 else None


def random_condition(rng: random.Random, depth=0):
    kind = rng.choice(["value", "any", "except", "text", "range", "count", "empty", "null", "id"]
                      + (["filter"] if depth < 2 else []))
    key = rng.choice(["colour", "n", "city.name", "city.pop", "flag", "nope", "city[].name"])
    if kind == "value":
        return {"key": key, "match": {"value": rng.choice(COLOURS + [1, 3, 7, True, False, "Paris"])}}
    if kind == "any":
        return {"key": key, "match": {"any": rng.choice([["red", "Paris"], [1, 2, 3], []])}}
    if kind == "except":
        return {"key": key, "match": {"except": rng.choice([["red", "blue"], [1, 2], ["Paris"]])}}
    if kind == "text":
        return {"key": key, "match": {"text": rng.choice(["re", "ar", "x"])}}
    if kind == "range":
        return {"key": key, "range": {rng.choice(["gt", "gte", "lt", "lte"]): rng.uniform(-3, 8)}}
    if kind == "count":
        return {"key": key, "values_count": {rng.choice(["gt", "gte", "lt", "lte"]): rng.randint(0, 3)}}
    if kind == "empty":
        return {"is_empty": {"key": key}}
    if kind == "null":
        return {"is_null": {"key": key}}
    if kind == "id":
        return {"has_id": rng.sample(range(60), 10)}
    return random_filter(rng, depth + 1)


def random_filter(rng: random.Random, depth=0):
    f = {}
    for part in ("must", "should", "must_not"):
        if rng.random() < 0.5:
            conds = [random_condition(rng, depth) for _ in range(rng.randint(1, 3))]
            f[part] = conds if len(conds) > 1 or rng.random() < 0.5 else conds[0]
    if rng.random() < 0.3:
        conds = [random_condition(rng, depth) for _ in range(rng.randint(0, 4))]
        f["min_should"] = {"conditions": conds, "min_count": rng.randint(0, len(conds) + 1)}
    return f


def test_filters_follow_qdrant_semantics_on_random_payloads():
    rng = random.Random(0)
    payloads = {i: random_payload(rng) for i in range(60)}
    indexes = {}

    def field(key):
        if key not in indexes:
            indexes[key] = FieldIndex(key)
            for i, p in payloads.items():
                indexes[key].add(i, p)
        return indexes[key]

    evaluator = Evaluator(np.arange(60), field)
    for trial in range(400):
        f = random_filter(rng)
        got = evaluator.ids(schemas.Filter.model_validate(f)).tolist()
        want = [i for i, p in payloads.items() if ref_filter(i, p, f)]
        assert got == want, (trial, f)


def test_field_indexes_kept_through_random_writes_answer_like_the_payloads():
    """Upserts (single and in batches, an id twice in a batch), replacements and deletes, then
    every random filter against the reference over the payloads that remain."""
    rng = random.Random(1)
    keys = ["colour", "n", "city.name", "city.pop", "flag", "nope", "city[].name"]
    indexes = {key.replace("[]", ""): FieldIndex(key) for key in keys}
    payloads = {}
    for step in range(300):
        ids = [rng.randrange(80) for _ in range(rng.choice([1, 1, 5, 20]))]
        # what the stored ones held, as the engine passes it (or not: every bitmap looked at)
        old = {i: payloads[i] for i in ids if i in payloads} if rng.random() < 0.7 else None
        if rng.random() < 0.25:
            for index in indexes.values():
                index.remove_many(ids, old)
            for i in ids:
                payloads.pop(i, None)
        else:
            batch = [random_payload(rng) for _ in ids]
            for index in indexes.values():
                index.add_many(ids, batch, old)
            payloads.update(zip(ids, batch))  # the last payload of an id wins
    stored = np.array(sorted(payloads))
    evaluator = Evaluator(stored, lambda key: indexes[key.replace("[]", "")])
    for trial in range(400):
        f = random_filter(rng)
        got = evaluator.ids(schemas.Filter.model_validate(f)).tolist()
        want = [i for i in stored.tolist() if ref_filter(i, payloads[i], f)]
        assert got == want, (trial, f)


def test_field_index_follows_updates_and_deletes():
    index = FieldIndex("tags")
    index.add(1, {"tags": ["a", "b"]})
    index.add(2, {"tags": "a"})
    index.add(1, {"tags": ["c"]})  # an upsert replaces
    index.remove(2)
    evaluator = Evaluator(np.array([1, 2]), lambda key: index)
    ids = lambda f: evaluator.ids(schemas.Filter.model_validate(f)).tolist()
    assert ids({"must": {"key": "tags", "match": {"value": "a"}}}) == []
    assert ids({"must": {"key": "tags", "match": {"value": "c"}}}) == [1]
    assert ids({"must": {"is_empty": {"key": "tags"}}}) == [2]


def test_payload_indexes_come_back_from_the_snapshot_and_the_writes_after_it(data_dir, vectors, monkeypatch):
    """Declared indexes are saved with the snapshot; a restart loads them, takes out the points
    deleted since and indexes again the points written or whose payload changed since.  Every
    declared field then answers random filters and counts its points like the payloads."""
    rng = random.Random(4)
    payloads = {i: random_payload(rng) for i in range(120)}
    store = Store(data_dir, snapshot_every=10**9, fast_ingest=False)
    c = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    c.upsert(list(payloads), vectors[:120], list(payloads.values()))
    for key, schema in (("colour", "keyword"), ("n", "float"), ("city.pop", "integer"), ("city.name", "keyword")):
        c.create_field_index(key, schema)
    c.snapshots.write()
    c.delete(list(range(10)))  # after the snapshot: deletes, replacements, payload updates, new points
    replaced = {i: random_payload(rng) for i in list(range(10, 30)) + list(range(120, 140))}
    c.upsert(list(replaced), vectors[10:50], list(replaced.values()))
    c.update_payloads(list(range(30, 40)), None, lambda p: {**p, "colour": "blue", "n": 4})
    c.delete_field_index("city.name")
    c.create_field_index("flag", "bool")
    store.close()
    for i in range(10):
        del payloads[i]
    payloads.update(replaced)
    for i in range(30, 40):
        payloads[i] = {**(payloads[i] or {}), "colour": "blue", "n": 4}

    loaded = []
    from_arrays = FieldIndex.from_arrays.__func__
    monkeypatch.setattr(FieldIndex, "from_arrays", classmethod(lambda cls, a: loaded.append(1) or from_arrays(cls, a)))
    for restart in range(2):  # the second restart loads the same snapshot again
        loaded.clear()
        store = Store(data_dir, snapshot_every=10**9)
        store.open_all()
        c = store.get("c")
        assert len(loaded) == 3  # colour, n and city.pop from the snapshot; flag built from the payloads
        declared = ["colour", "n", "city.pop", "flag"]
        assert sorted(c.payload_indexes.fields) == sorted(declared)
        for key in declared:  # the points holding a value: none deleted since is left in
            assert c.payload_indexes.schema()[key]["points"] == sum(bool(ref_values(p, key)) for p in payloads.values())
        stored = np.array(sorted(payloads))
        evaluator = Evaluator(stored, lambda key: c.payload_indexes.fields[key.replace("[]", "")])
        for trial in range(300):
            f = random_filter(rng)
            text = str(f)
            if any(f"'{k}'" in text for k in ("nope", "city.name", "city[].name")):
                continue  # not declared: built on demand, not from the snapshot
            got = evaluator.ids(schemas.Filter.model_validate(f)).tolist()
            assert got == [i for i in stored.tolist() if ref_filter(i, payloads[i], f)], (restart, trial, f)
        store.close()


def colour_ids(c, colour: str) -> np.ndarray:
    """The internal ids of c's points whose payload has this colour, through its filters."""
    return c.filter_ids(schemas.Filter.model_validate({"must": {"key": "colour", "match": {"value": colour}}}),
                        lambda ids: ids)


def test_uuid_points_deleted_after_the_snapshot_leave_the_loaded_index(data_dir, vectors):
    """Only deletes since the snapshot: the loaded index loses exactly those points (UUIDs live at
    internal ids of 2^62 and above, where a float64 cannot tell neighbours apart)."""
    ids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(8)]
    store = Store(data_dir, snapshot_every=10**9, fast_ingest=False)
    c = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    c.upsert(ids, vectors[:8], [{"colour": "red"}] * 8)
    c.create_field_index("colour", "keyword")
    c.snapshots.write()
    c.delete([ids[1], ids[3]])
    store.close()
    store = Store(data_dir)
    store.open_all()
    c = store.get("c")
    red = colour_ids(c, "red")
    assert sorted(c.point_ids.external(int(i)) for i in red) == [ids[i] for i in (0, 2, 4, 5, 6, 7)]
    assert c.payload_indexes.schema()["colour"]["points"] == 6
    store.close()


def test_a_damaged_payload_index_in_the_snapshot_is_rebuilt(data_dir, vectors):
    store = Store(data_dir, snapshot_every=10**9, fast_ingest=False)
    c = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    c.upsert(list(range(50)), vectors[:50], [{"colour": COLOURS[i % 4]} for i in range(50)])
    c.create_field_index("colour", "keyword")
    c.snapshots.write()
    store.close()
    (data_dir / "collections" / "c" / "snapshot" / "payload_0.npz").write_bytes(b"not a zip")
    store = Store(data_dir)
    store.open_all()
    c = store.get("c")
    red = colour_ids(c, "red")
    assert red.tolist() == list(range(0, 50, 4))
    store.close()


def test_payload_writes_of_an_older_build_after_the_snapshot_rebuild_the_indexes(data_dir, vectors):
    """A build before session 16 changed payloads without setting points.seq (a downgrade, writes,
    an upgrade): the snapshot's index cannot be brought up to date, so it is rebuilt."""
    import sqlite3
    store = Store(data_dir, snapshot_every=10**9, fast_ingest=False)
    c = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    c.upsert(list(range(40)), vectors[:40], [{"colour": "red"}] * 40)
    c.create_field_index("colour", "keyword")
    c.snapshots.write()
    store.close()
    db = sqlite3.connect(data_dir / "collections" / "c" / "points.sqlite")
    with db:  # what such a build's set_payload wrote: the next seq, the points' own seq untouched
        db.execute("UPDATE points SET payload = ? WHERE id < 5", ('{"colour": "blue"}',))
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'seq'")
    db.close()
    store = Store(data_dir)
    store.open_all()
    c = store.get("c")
    blue = colour_ids(c, "blue")
    assert blue.tolist() == [0, 1, 2, 3, 4] and c.payload_indexes.schema()["colour"]["points"] == 40
    c.upsert([40], vectors[40:41], [{"colour": "blue"}])  # this build's writes are tracked again
    c.snapshots.write()
    store.close()
    store = Store(data_dir)
    store.open_all()
    assert store.get("c").payload_indexes.schema()["colour"]["points"] == 41
    store.close()


# ---- filtered search: the index against brute force ------------------------------------------

@pytest.fixture(scope="module")
def filtered_index(ivf_model, glove_sample):
    base = glove_sample[4000:7000]
    index = QincoIndex(ivf_model)
    index.add(base, np.arange(len(base)))
    decoded = decode(ivf_model, index.stored_codes()[1])[np.argsort(index.stored_codes()[0])]
    return index, decoded, glove_sample[7000:7100]


def exact_filtered(decoded, queries, allowed, k):
    d = ((queries[:, None, :] - decoded[allowed][None]) ** 2).sum(-1)
    return allowed[np.argsort(d, axis=1, kind="stable")[:, :k]]


@pytest.mark.parametrize("fraction", [0.5, 0.05, 0.01])
def test_filtered_search_keeps_its_recall(filtered_index, fraction):
    """Only allowed ids, min(k, allowed) results, and recall against exact filtered neighbours
    (over the same decodings) not below the unfiltered search's at the same parameters."""
    index, decoded, queries = filtered_index
    rng = np.random.default_rng(1)
    allowed = np.sort(rng.choice(len(decoded), int(fraction * len(decoded)), replace=False))
    params = SearchParams(nprobe=2, ef_search=32, nshort=20)
    _, got = index.search(queries, 10, params, allowed_ids=allowed)
    assert got.shape == (len(queries), min(10, len(allowed))) and np.isin(got, allowed).all()
    truth = exact_filtered(decoded, queries, allowed, 1)
    recall = np.mean([truth[q, 0] in got[q] for q in range(len(queries))])
    _, plain = index.search(queries, 10, params)
    plain_truth = exact_filtered(decoded, queries, np.arange(len(decoded)), 1)
    plain_recall = np.mean([plain_truth[q, 0] in plain[q] for q in range(len(queries))])
    assert recall >= plain_recall - 0.02, (recall, plain_recall)


def test_a_very_selective_filter_ranks_every_match_exactly(filtered_index):
    index, decoded, queries = filtered_index
    allowed = np.array([5, 77, 300, 1200, 2999, 10**9])  # 10**9 is not stored
    D, I = index.search(queries, 10, SearchParams(nprobe=1, ef_search=16, nshort=20), allowed_ids=allowed)
    assert I.shape == (len(queries), 5)
    assert (I == exact_filtered(decoded, queries, allowed[:-1], 5)).all()
    assert index.search(queries[:2], 10, allowed_ids=np.array([], dtype=np.int64))[1].shape == (2, 0)


# ---- over REST -----------------------------------------------------------------------------

def test_filters_over_rest_search_count_delete_and_payload_indexes(data_dir, vectors):
    rng = random.Random(3)
    payloads = [random_payload(rng) for _ in range(200)]
    f = {"must": [{"key": "colour", "match": {"any": ["red", "blue"]}}],
         "must_not": [{"key": "n", "range": {"gt": 2}}]}
    want = {i for i, p in enumerate(payloads) if ref_filter(i, p, f)}
    with make_client(data_dir) as c:
        wait_ready(c)
        create(c)
        points = [{"id": i, "vector": v.tolist(), **({"payload": p} if p is not None else {})}
                  for i, (v, p) in enumerate(zip(vectors[:200], payloads))]
        assert c.put("/collections/c/points", json={"points": points}).status_code == 200
        count = c.post("/collections/c/points/count", json={"filter": f}).json()["result"]["count"]
        assert count == len(want)
        hits = c.post("/collections/c/points/search", json={"vector": vectors[0].tolist(), "limit": 50,
                                                            "filter": f}).json()["result"]
        assert {h["id"] for h in hits} <= want and len(hits) == min(50, len(want))
        batch = c.post("/collections/c/points/search/batch", json={"searches": [
            {"vector": vectors[1].tolist(), "limit": 5, "filter": f}, {"vector": vectors[1].tolist(), "limit": 5}]})
        a, b = batch.json()["result"]
        assert {h["id"] for h in a} <= want and len(b) == 5
        rec = c.post("/collections/c/points/recommend", json={"positive": [0], "filter": f, "limit": 5}).json()
        assert {h["id"] for h in rec["result"]} <= want - {0}

        r = c.put("/collections/c/index", json={"field_name": "colour", "field_schema": "keyword"})
        assert r.status_code == 200 and r.json()["result"]["status"] == "completed"
        info = c.get("/collections/c").json()["result"]
        assert info["payload_schema"]["colour"]["data_type"] == "keyword"
        assert c.post("/collections/c/points/count", json={"filter": f}).json()["result"]["count"] == len(want)

        r = c.post("/collections/c/points/delete", json={"filter": f})
        assert r.status_code == 200 and r.json()["result"]["count"] == len(want)
        assert c.get("/collections/c/points/count").json()["result"]["count"] == 200 - len(want)
        assert c.post("/collections/c/points/count", json={"filter": f}).json()["result"]["count"] == 0
        upd = {"points": [{"id": 1000, "vector": vectors[300].tolist(), "payload": {"colour": "red"}}]}
        assert c.put("/collections/c/points", json=upd).status_code == 200  # the index follows writes
        assert c.post("/collections/c/points/count", json={"filter": f}).json()["result"]["count"] == 1

    with make_client(data_dir) as c:  # the declared index is durable, rebuilt on start
        wait_ready(c)
        assert c.get("/collections/c").json()["result"]["payload_schema"]["colour"]["points"] > 0
        assert c.post("/collections/c/points/count", json={"filter": f}).json()["result"]["count"] == 1
        assert c.delete("/collections/c/index/colour").status_code == 200
        assert c.delete("/collections/c/index/colour").status_code == 404
        assert c.get("/collections/c").json()["result"]["payload_schema"] == {}


def nested(depth):
    f = {"must": []}
    for _ in range(depth):
        f = {"must": [f]}
    return f


@pytest.mark.parametrize("bad", [
    {"must": [{"key": "a"}]},
    {"must": [{"key": "a", "match": {"value": 1.5}}]},
    {"must": [{"key": "a", "match": {"value": "x"}, "range": {"gt": 1}}]},
    {"must": [{"key": "a", "range": {"gt": "NaN"}}]},
    {"must": [{"key": "a", "match": {"any": [1, "x"]}}]},
    {"must": [{"key": "", "match": {"value": 1}}]},
    {"must": [{"bogus": 1}]},
    {"must": [{"has_id": [-1]}]},
    {"must": [{"key": "a", "values_count": {"gt": -1}}]},
    {"must": [{"key": "a", "match": {"value": 2**64}}]},
    {"min_should": 1},
    nested(20),
])
def test_bad_filters_get_4xx_with_a_message(data_dir, vectors, bad):
    with make_client(data_dir) as c:
        wait_ready(c)
        create(c)
        for path, body in [("/collections/c/points/search", {"vector": vectors[0].tolist(), "filter": bad}),
                           ("/collections/c/points/count", {"filter": bad}),
                           ("/collections/c/points/delete", {"filter": bad})]:
            r = c.post(path, json=body)
            assert 400 <= r.status_code < 500 and len(r.json()["status"]["error"]) > 5, (path, r.text)
        r = c.put("/collections/c/index", json={"field_name": "x", "field_schema": "geo"})
        assert r.status_code == 422
