"""Self-training collections over REST: create by size and distance, exact search while collecting,
automatic training, the swap, retraining, cancel, swap-in of a model file, rescore, kill -9."""

import json
import logging
import os
import signal
import time

import httpx
import numpy as np
import pytest

from model.io import save_model
from service.engine.search import RESCORE_SHORTLIST
from tests.server import free_port, serve

SETTINGS = {"bytes": 4, "train_after": 2000, "train_minutes": 0.05}
ENV = {"QINCO_TRAIN_THREADS": "1"}


@pytest.fixture
def server(tmp_path, ivf_model):
    (tmp_path / "models").mkdir()
    save_model(ivf_model, tmp_path / "models" / "ivf.safetensors")
    port = free_port()
    proc = serve(tmp_path, port, "--no-demo", env=ENV)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    proc.kill()
    proc.wait()


def create(client, name="own", distance="Euclid", **qinco):
    r = client.put(f"/collections/{name}", json={"vectors": {"size": 50, "distance": distance},
                                                 "qinco": {**SETTINGS, **qinco}})
    assert r.status_code == 200 and r.json()["result"] is True, r.text  # Qdrant answers true
    return info(client, name)


def upsert(client, ids, x, name="own"):
    r = client.put(f"/collections/{name}/points",
                   json={"batch": {"ids": [int(i) for i in ids], "vectors": x.tolist(),
                                   "payloads": [{"i": int(i), "even": int(i) % 2 == 0} for i in ids]}})
    assert r.status_code == 200, r.text


def info(client, name="own"):
    r = client.get(f"/collections/{name}")
    assert r.status_code == 200, r.text
    return r.json()["result"]


def wait_for(client, done, name="own", timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        i = info(client, name)
        if done(i):
            return i
        assert i["qinco"]["last_error"] is None, i["qinco"]["last_error"]
        time.sleep(0.2)
    raise AssertionError(f"timed out: {info(client, name)['qinco']}")


def search(client, x, name="own", **body):
    r = client.post(f"/collections/{name}/points/search", json={"vector": x.tolist(), **body})
    assert r.status_code == 200, r.text
    return r.json()["result"]


def exact_ids(base, ids, q, k):
    d = ((base - q) ** 2).sum(1)
    return [int(ids[j]) for j in np.argsort(d, kind="stable")[:k]]


def test_create_by_shape_collect_train_swap_retrain(server, glove_sample):
    x = glove_sample
    i = create(server)
    assert i["status"] == "grey" and i["qinco"]["phase"] == "collecting"
    assert i["config"]["params"]["vectors"] == {"size": 50, "distance": "Euclid"}
    # Collecting: exact results from the first point on, filters included.
    upsert(server, range(1500), x[:1500])
    for q in x[5000:5005]:
        hits = search(server, q, limit=5)
        assert [h["id"] for h in hits] == exact_ids(x[:1500], np.arange(1500), q, 5)
        assert abs(hits[0]["score"] - float(np.sqrt(((x[hits[0]["id"]] - q) ** 2).sum()))) < 1e-4
        filtered = search(server, q, limit=5, filter={"must": [{"key": "even", "match": {"value": True}}]})
        assert [h["id"] for h in filtered] == exact_ids(x[:1500:2], np.arange(0, 1500, 2), q, 5)
    # The 2000th point starts training; writes go on during it and none is lost.
    upsert(server, range(1500, 2100), x[1500:2100])
    i = wait_for(server, lambda i: i["qinco"]["phase"] != "collecting")
    assert i["status"] == "yellow" and i["qinco"]["job"]["kind"] == "train"
    written, etas = 2100, []
    while (i := info(server))["qinco"]["phase"] != "ready":
        etas.append((i["qinco"]["job"] or {}).get("eta_seconds"))
        assert search(server, x[7], limit=1)[0]["id"] == 7  # searches go on during the job
        if written < 4000:
            upsert(server, range(written, written + 100), x[written:written + 100])
            written += 100
        assert i["qinco"]["last_error"] is None, i["qinco"]["last_error"]
        time.sleep(0.05)
    assert any(e is not None and e >= 0 for e in etas), etas
    upsert(server, range(written, written + 100), x[written:written + 100])
    written += 100
    i = wait_for(server, lambda i: i["qinco"]["refine_pending"] == 0)  # fast ingest: refined in the background
    assert i["status"] == "green" and i["points_count"] == written
    r = server.post("/collections/own/points", json={"ids": [5], "with_vector": True})
    assert np.allclose(r.json()["result"][0]["vector"], x[5], atol=1e-6)  # the original, kept on disk
    q = i["qinco"]
    assert q["model"]["generation"] == 1 and q["model"]["bytes"] == 4 and q["points_encoded"] == written
    assert q["model"]["mse_vs_rq"] is not None and q["last_swap"] is not None and q["originals"] == written
    assert q["bytes_per_point"]["memory"] == 5 + 8 and q["bytes_per_point"]["disk"] > 50 * 4
    metrics = server.get("/metrics").text
    for line in ('qinco_collection_status{collection="own",status="green"} 1.0',
                 f'qinco_points_encoded{{collection="own"}} {float(written)}',
                 'qinco_refine_pending{collection="own"} 0.0',
                 'qinco_model_last_swap_timestamp_seconds{collection="own"} 1.',
                 'qinco_bytes_per_point{collection="own",where="memory"} 13.0',
                 'qinco_model_generation{collection="own"} 1.0'):
        assert line in metrics, line
    # Every point is served by the new model: a stored vector finds itself.
    found = sum(search(server, x[j], limit=1)[0]["id"] == j for j in range(0, written, 97))
    assert found >= 0.8 * len(range(0, written, 97))
    r = server.post("/collections/own/points/count", json={"exact": True})
    assert r.json()["result"]["count"] == written
    # Rescore: the candidates in the exact order of their originals.
    for qv in x[6000:6005]:
        hits = search(server, qv, limit=10, params={"nshort": 0, "quantization": {"rescore": True, "oversampling": 3}})
        exact = [float(np.sqrt(((x[h["id"]] - qv) ** 2).sum())) for h in hits]
        assert np.allclose([h["score"] for h in hits], exact, atol=1e-4) and exact == sorted(exact)
        # nshort 0: the 30 candidates are the scan's first 30 (the decoder, which would only reorder
        # them, is skipped): the same set a decoded shortlist of 30 holds, ranked by their originals.
        table = [h["id"] for h in search(server, qv, limit=30, params={"nshort": 0})]
        assert {h["id"] for h in search(server, qv, limit=30, params={"nshort": 30})} == set(table)
        by_original = sorted(table, key=lambda j: float(((x[j] - qv) ** 2).sum()))
        assert [h["id"] for h in hits] == by_original[:10]
        # Qdrant's default oversampling (1): the shortlist (here 50) ranked by the originals; with no
        # nshort, the scan's first RESCORE_SHORTLIST.
        for nshort in (50, None):
            first = [h["id"] for h in search(server, qv, limit=nshort or RESCORE_SHORTLIST, params={"nshort": 0})]
            params = {"quantization": {"rescore": True}, **({"nshort": nshort} if nshort else {})}
            hits = search(server, qv, limit=10, params=params)
            assert [h["id"] for h in hits] == sorted(first, key=lambda j: float(((x[j] - qv) ** 2).sum()))[:10]
    # Retrain: 409 while a job runs, then a second swap.
    r = server.post("/collections/own/train", json={"minutes": 0.05})
    assert r.status_code == 202 and r.json()["result"]["job"]["kind"] == "train"
    r = server.post("/collections/own/train")
    assert r.status_code == 409 and "already training" in r.json()["status"]["error"]
    i = wait_for(server, lambda i: i["qinco"]["model"]["generation"] == 2 and i["qinco"]["phase"] == "ready")
    assert i["points_count"] == written
    # A cancelled job leaves the serving model; cancelling nothing is a 404.
    assert server.post("/collections/own/train", json={"minutes": 5}).status_code == 202
    r = server.delete("/collections/own/train")
    assert r.status_code == 200, r.text
    i = info(server)
    assert i["qinco"]["job"] is None and i["qinco"]["model"]["generation"] == 2 and i["status"] == "green"
    assert server.delete("/collections/own/train").status_code == 404
    # Swap in a model trained offline (the conftest's IVF model).
    r = server.post("/collections/own/train", json={"model": "models/ivf.safetensors"})
    assert r.status_code == 202, r.text
    i = wait_for(server, lambda i: i["qinco"]["model"]["generation"] == 3 and i["qinco"]["phase"] == "ready")
    assert i["qinco"]["model"]["nlist"] == 16 and i["points_count"] == written


def test_keep_originals_false_holds_only_codes(server, glove_sample):
    create(server, "codes", distance="Cosine", keep_originals=False, train_after=0)
    x = glove_sample[:1200]
    upsert(server, range(1200), x, name="codes")
    assert info(server, "codes")["qinco"]["phase"] == "collecting"  # train_after 0: no automatic training
    r = server.post("/collections/codes/train", json={"minutes": 0.05, "nlist": 64})
    assert r.status_code == 400 and "at least 2048" in r.json()["status"]["error"]
    assert server.post("/collections/codes/train", json={"minutes": 0.05}).status_code == 202
    i = wait_for(server, lambda i: i["qinco"]["phase"] == "ready", name="codes")
    assert i["qinco"]["originals"] == 0 and i["status"] == "green"
    r = server.post("/collections/codes/points", json={"ids": [3], "with_vector": True})
    decoded = np.array(r.json()["result"][0]["vector"])  # the model's decoding: no originals left
    assert decoded.shape == (50,) and np.dot(decoded, x[3]) / np.linalg.norm(decoded) > 0.5
    hits = search(server, x[3], name="codes", limit=3)
    assert hits[0]["id"] == 3 and hits[0]["score"] > 0.9  # cosine similarity
    # Qdrant ignores quantization settings that do not apply: rescore without originals too.
    assert search(server, x[3], name="codes", limit=3, params={"rescore": True}) == hits
    r = server.post("/collections/codes/train")
    assert r.status_code == 400 and "keeps no original vectors" in r.json()["status"]["error"]


@pytest.mark.parametrize("body, status, message", [
    ({"vectors": {"size": 50, "distance": "Dot"}}, 422, "'Dot' is not supported"),
    ({"vectors": {"size": 50, "distance": "Manhattan"}}, 422, "not supported"),
    ({"vectors": {"text": {"size": 50, "distance": "Dot"}}}, 422, "'Dot' is not supported"),
    ({"vectors": {"text": {"size": 50, "distance": "Cosine"}}, "qinco": {"train_after": 10}}, 400, "at least 1000"),
    ({"vectors": {"size": 0, "distance": "Cosine"}}, 422, "size"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "qinco": {"train_after": 10}}, 400, "at least 1000"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "qinco": {"train_after": 2000, "nlist": 1024}}, 400,
     "nlist 1024"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "qinco": {"colour": "red"}}, 422, "colour"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "qinco": {"train_minutes": 0}}, 422, "train_minutes"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "qinco": {"retrain_growth": 1}}, 422, "at least 1.5"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "qinco": {"retrain_growth": 0.5}}, 422, "at least 1.5"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "qinco": {"retrain_growth": True}}, 422, "retrain_growth"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "metric": "l2"}, 422, "distance"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "model": "models/ivf.safetensors"}, 422, "exactly one"),
    ({"model": "models/ivf.safetensors", "qinco": {"bytes": 8}}, 422, "'qinco' settings"),
    ({"vectors": {"size": 50, "distance": "Cosine"}, "shard_number": 2}, 422, "shard_number"),
])
def test_bad_create_bodies_change_nothing(server, body, status, message):
    r = server.put("/collections/bad", json=body)
    assert r.status_code == status, r.text
    assert message in r.text
    assert server.get("/collections/bad/exists").json()["result"]["exists"] is False


def test_qdrant_create_body_and_bad_train_requests(server, glove_sample):
    # Qdrant's full create body, as qdrant-client sends it: the extra settings are accepted.
    r = server.put("/collections/q", json={"vectors": {"size": 50, "distance": "Cosine", "on_disk": None},
                                           "shard_number": 1, "replication_factor": 1, "on_disk_payload": True,
                                           "hnsw_config": {"m": 16}, "sparse_vectors": {}})
    assert r.status_code == 200, r.text
    r = server.put("/collections/q/points", json={"points": [{"id": 1, "vector": [0.1] * 49}]})
    assert r.status_code == 400 and "expected dim 50" in r.text
    r = server.post("/collections/q/train")
    assert r.status_code == 400 and "training needs at least 1000" in r.json()["status"]["error"]
    r = server.post("/collections/q/train", json={"model": "models/ivf.safetensors", "minutes": 1})
    assert r.status_code == 422
    r = server.post("/collections/q/train", json={"model": "../outside.safetensors"})
    assert r.status_code == 400
    r = server.post("/collections/q/train", json={"minutes": 1, "colour": "blue"})
    assert r.status_code == 422 and "colour" in r.text
    assert server.put("/collections/d32", json={"vectors": {"size": 32, "distance": "Euclid"}}).status_code == 200
    r = server.post("/collections/d32/train", json={"model": "models/ivf.safetensors"})
    assert r.status_code == 400 and "dimension 50" in r.json()["status"]["error"]
    assert info(server, "d32")["qinco"]["job"] is None
    # A collection created from a model keeps no originals: it cannot train or rescore.
    assert server.put("/collections/m", json={"model": "models/ivf.safetensors"}).status_code == 200
    r = server.post("/collections/m/train")
    assert r.status_code == 400 and "keeps no original vectors" in r.json()["status"]["error"]
    m = info(server, "m")
    assert m["status"] == "green" and m["qinco"]["phase"] == "ready" and m["qinco"]["model"]["generation"] == 0
    metrics = server.get("/metrics").text
    assert 'qinco_collection_phase{collection="q",phase="collecting"} 1.0' in metrics


def test_kill_9_during_training_and_encoding_loses_nothing(tmp_path, glove_sample):
    """The server dies mid-training, then mid-encoding: every acknowledged point is there after
    each restart, the job resumes by itself, and the collection ends serving its new model."""
    x = glove_sample
    port = free_port()
    proc = serve(tmp_path, port, "--no-demo", env=ENV)
    url = f"http://127.0.0.1:{port}"
    acked = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        create(client, train_minutes=0.3)
        for start in range(0, 6000, 500):
            upsert(client, range(start, start + 500), x[start:start + 500])
            acked = start + 500
        wait_for(client, lambda i: (i["qinco"]["job"] or {}).get("phase") == "training")
        upsert(client, range(acked, acked + 100), x[acked:acked + 100])
        acked += 100
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for kill_in in ("encoding", None):
        port = free_port()
        proc = serve(tmp_path, port, "--no-demo", env=ENV)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            i = info(client)
            assert i["points_count"] == acked
            if kill_in is None:
                i = wait_for(client, lambda i: i["qinco"]["phase"] == "ready")
                assert i["qinco"]["model"]["generation"] == 1 and i["points_count"] == acked
                r = client.post("/collections/own/points", json={"ids": list(range(acked)), "with_payload": True})
                assert sorted(p["payload"]["i"] for p in r.json()["result"]) == list(range(acked))
                assert search(client, x[4321], limit=1)[0]["id"] == 4321
            else:
                assert i["qinco"]["job"] is not None  # resumed by itself
                wait_for(client, lambda i: i["qinco"]["phase"] in (kill_in, "ready"), timeout=300)
        proc.send_signal(signal.SIGKILL)
        proc.wait()


class FailingGenerationUpdate:
    """A connection that fails the swap's transaction after the codes of every point are written."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql.startswith("UPDATE meta") and "generation" in (args[0] if args else ()):
            raise OSError("disk full (simulated)")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_swap_failing_mid_transaction_leaves_the_old_state(tmp_path, glove_sample):
    from service.engine.registry import Store
    x = glove_sample[:1200]
    store = Store(tmp_path, train_threads=1)
    store.open_all()
    c = store.create("s", "l2", "balanced", size=50, qinco={**SETTINGS, "train_after": 0, "keep_originals": True,
                                                            "nlist": None})
    c.upsert(list(range(1200)), x, [None] * 1200)
    c.record.db = FailingGenerationUpdate(c.record.db)
    c.start_training()
    deadline = time.time() + 180
    while c.space.job is not None and time.time() < deadline:
        time.sleep(0.2)
    status = c.qinco_status()
    assert "disk full" in status["last_error"] and status["phase"] == "collecting" and c.space.generation == 0
    assert [h.id for h in c.search(x[5:6], 1, {}, False, False)[0]] == [5]  # still exact
    store.close()
    store = Store(tmp_path)
    store.open_all()
    c = store.get("s")
    assert c.space.model is None and c.count() == 1200 and not list(tmp_path.glob("collections/s/model*.safetensors"))
    codes = {bytes(r[0]) for r in c.record.db.execute("SELECT codes FROM codes")}
    assert codes == {b""}  # the rolled-back transaction wrote no codes
    store.close()


def test_a_cancel_while_collecting_pauses_automatic_training(tmp_path, glove_sample):
    from service.engine.registry import Store
    x = glove_sample[:1300]
    store = Store(tmp_path, train_threads=1, encode_threads=3)
    store.open_all()
    c = store.create("p", "l2", "balanced", size=50, qinco={**SETTINGS, "train_after": 1000, "train_minutes": 5,
                                                            "keep_originals": True, "nlist": None})
    c.upsert(list(range(1000)), x[:1000], [None] * 1000)
    deadline = time.time() + 30
    while c.space.job is None and time.time() < deadline:  # started by the 1000th point
        time.sleep(0.05)
    assert c.space.job is not None
    request = c.space.job.dir / "request.json"
    while not request.exists() and time.time() < deadline:
        time.sleep(0.05)
    request = json.loads(request.read_text())  # the worker trains on one thread and encodes on three
    assert (request["threads"], request["encode_threads"]) == (1, 3)
    assert c.cancel_training()
    c.upsert(list(range(1000, 1300)), x[1000:], [None] * 300)
    time.sleep(0.5)
    assert c.space.job is None and c.qinco_status()["phase"] == "collecting"  # no new automatic job
    store.close()
    store = Store(tmp_path, train_threads=1)
    store.open_all()
    c = store.get("p")
    c.upsert([2000], x[:1], [None])
    time.sleep(0.5)
    assert c.space.job is None  # still paused after a restart; an explicit request trains
    c.start_training({"train_minutes": 0.05})
    assert c.space.job is not None and "paused" not in c.space.facts
    c.cancel_training()
    store.close()


def test_a_collection_that_outgrows_its_model_retrains_with_more_lists(tmp_path, glove_sample):
    """Once a job would sample retrain_growth times the points the model trained on, a job starts
    by itself, with the model's code size and never fewer lists; a cancel pauses it; 0 turns it off."""
    from service.engine.registry import Store
    from service.training.policy import auto_nlist
    x = glove_sample[:4100]
    store = Store(tmp_path, train_threads=1)
    store.open_all()
    q = {**SETTINGS, "train_after": 1000, "keep_originals": True, "nlist": None}
    c = store.create("g", "l2", "balanced", size=50, qinco={**q, "retrain_growth": 2})
    off = store.create("off", "l2", "balanced", size=50, qinco={**q, "retrain_growth": 0})
    manual = store.create("manual", "l2", "balanced", size=50, qinco={**q, "retrain_growth": 2, "train_after": 0})
    manual.upsert(list(range(1000)), x[:1000], [None] * 1000)
    manual.start_training({"train_minutes": 0.05})

    def served(col, generation):
        deadline = time.time() + 180
        while (col.space.generation < generation or col.space.job is not None) and time.time() < deadline:
            assert "last_error" not in col.space.facts, col.space.facts
            time.sleep(0.1)
        assert col.space.generation == generation and col.space.job is None
        return col.qinco_status()["model"]

    for col in (c, off, manual):
        if col is not manual:
            col.upsert(list(range(1000)), x[:1000], [None] * 1000)
        model = served(col, 1)
        assert model["trained_on"] == 1000 and model["nlist"] == auto_nlist(1000) == 8 and model["bytes"] == 4
    c.start_training({"train_minutes": 0.05, "bytes": 2, "nlist": 20})  # a user's retrain: 2 bytes, 20 lists
    served(c, 2)
    manual.upsert(list(range(1000, 3000)), x[1000:3000], [None] * 2000)  # trains only on request
    for col in (c, off):
        col.upsert(list(range(1000, 1999)), x[1000:1999], [None] * 999)
        time.sleep(0.5)
        assert col.space.job is None  # 1,999 points: under 2 x 1,000
    assert c.qinco_status()["retrain_growth"] == 2
    c.upsert([1999], x[1999:2000], [None])
    model = served(c, 3)  # outgrown: retrained on all 2,000, with its 2 bytes and 20 lists (the count's: 16)
    assert (model["trained_on"], model["bytes"], model["nlist"], auto_nlist(2000)) == (2000, 2, 20, 16)
    c.upsert(list(range(2000, 4000)), x[2000:4000], [None] * 2000)  # 2 x 2,000 again
    deadline = time.time() + 30
    while c.space.job is None and time.time() < deadline:
        time.sleep(0.05)
    assert c.cancel_training() and c.qinco_status()["paused"]
    c.upsert([4000], x[4000:4001], [None])
    off.upsert(list(range(1999, 4100)), x[1999:4100], [None] * 2101)
    time.sleep(0.5)
    assert c.space.job is None and c.space.generation == 3  # paused until a train request
    assert off.space.job is None and off.space.generation == 1 and off.qinco_status()["retrain_growth"] == 0
    assert manual.space.job is None and manual.space.generation == 1
    store.close()


SWAP_CHILD = r'''
import sys, time
from pathlib import Path
from service.engine.lifecycle import Trainer
from service.engine.registry import Store
from service.engine.space import VectorSpace

data, stage = Path(sys.argv[1]), sys.argv[2]


def hang():
    (data / "stage-reached").write_text(stage)
    time.sleep(3600)  # until the test kills this process


class HangAfterGeneration:
    """The swap's transaction, stopped after its last statement: every code and the generation
    written, not committed."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        out = self.db.execute(sql, *args)
        if sql.startswith("UPDATE meta") and "generation" in (args[0] if args else ()):
            hang()
        return out

    def __getattr__(self, name):
        return getattr(self.db, name)


swap = Trainer.swap


def swap_then_hang(self, job, *args, **kwargs):
    if stage == "in_transaction":
        self.c.record.db = HangAfterGeneration(self.c.record.db)
    return swap(self, job, *args, **kwargs)


Trainer.swap = swap_then_hang
if stage == "after_commit":  # committed and switched in memory; the old files not yet removed
    remove = VectorSpace.remove_stale_models
    VectorSpace.remove_stale_models = lambda self: hang() if self.generation else remove(self)
store = Store(data, train_threads=1)
store.open_all()  # resumes the job, which trains, encodes and swaps
time.sleep(3600)
'''


@pytest.mark.parametrize("stage", ["in_transaction", "after_commit"])
def test_kill_9_inside_the_swap(tmp_path, glove_sample, stage, caplog):
    """A process killed inside the swap's transaction restarts on the old state (collecting,
    every point) and its job runs again; one killed after the commit serves the new model."""
    import subprocess
    import sys

    from service.engine.registry import Store
    from tests.server import ROOT
    x = glove_sample[:1200]
    store = Store(tmp_path, train_threads=1)
    store.open_all()
    c = store.create("s", "l2", "balanced", size=50, qinco={**SETTINGS, "train_after": 0, "keep_originals": True,
                                                            "nlist": None})
    c.upsert(list(range(1200)), x, [{"i": i} for i in range(1200)])
    c.start_training()
    store.close()  # the job's record stays: the child process resumes it
    child = subprocess.Popen([sys.executable, "-c", SWAP_CHILD, str(tmp_path), stage], cwd=ROOT,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "stage-reached").exists():
            assert child.poll() is None and time.time() < deadline, f"the child never reached {stage}"
            time.sleep(0.1)
    finally:
        child.kill()  # SIGKILL
        child.wait()

    caplog.set_level(logging.INFO, logger="qinco.jobs")
    store = Store(tmp_path, train_threads=1)
    store.open_all()
    c = store.get("s")
    assert c.count() == 1200 and c.payloads([7])[7] == {"i": 7}
    if stage == "in_transaction":
        assert c.space.generation == 0 and c.space.model is None and c.qinco_status()["phase"] == "training"
        deadline = time.time() + 30
        while c.space.job._process is None and time.time() < deadline:
            time.sleep(0.01)
        worker, lower = c.space.job._process, min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        niced = False
        while not niced and worker.poll() is None and time.time() < deadline:  # the worker lowers its own
            try:
                niced = os.getpriority(os.PRIO_PROCESS, worker.pid) == lower
            except ProcessLookupError:  # gone meanwhile
                break
            time.sleep(0.01)
        assert niced, "the training worker did not run below the server's priority"
        assert {bytes(r[0]) for r in c.record.db.execute("SELECT codes FROM codes")} == {b""}
        deadline = time.time() + 240
        while c.space.job is not None and time.time() < deadline:  # the resumed job swaps this time
            time.sleep(0.2)
        progress = [r.getMessage() for r in caplog.records if r.name == "qinco.jobs"]
        assert any(" training " in m and "%" in m for m in progress), progress  # the server log follows the job
    assert c.space.generation == 1 and c.space.model is not None and c.space.job is None and c.count() == 1200
    assert c.qinco_status()["phase"] == "ready" and c.qinco_status()["last_error"] is None
    assert sorted(p.name for p in (tmp_path / "collections" / "s").glob("model*.safetensors")) == ["model-1.safetensors"]
    assert [h.id for h in c.search(x[5:6], 1, {"nprobe": c.space.model.cfg.nlist, "nshort": 200}, False, False)[0]] == [5]
    store.close()


def test_a_high_d_collection_trains_a_model_with_narrower_blocks(tmp_path, glove_sample):
    """From d = 256 on a job's model has de = 128 (`default_de`): it trains, swaps and serves."""
    from service.engine.registry import Store
    lift = np.random.default_rng(0).standard_normal((50, 256)).astype(np.float32)
    x = np.ascontiguousarray(glove_sample[:1200] @ lift)  # real vectors in 256 dimensions
    store = Store(tmp_path, train_threads=1)
    store.open_all()
    c = store.create("wide", "l2", "balanced", size=256, qinco={**SETTINGS, "train_after": 0, "keep_originals": True,
                                                               "nlist": None})
    c.upsert(list(range(1200)), x, [None] * 1200)
    c.start_training()
    deadline = time.time() + 180
    while c.space.generation == 0 and time.time() < deadline:
        assert c.qinco_status()["last_error"] is None, c.qinco_status()["last_error"]
        time.sleep(0.2)
    assert c.space.generation == 1 and c.space.model.cfg.de == 128 and c.space.model.cfg.d == 256
    assert c.count() == 1200
    assert [len(h) for h in c.search(x[:3], 10, {"rescore": True}, False, False)] == [10] * 3
    every = {"nprobe": c.space.model.cfg.nlist, "nshort": 1200, "rescore": True}  # all 1,200 points ranked
    hits = c.search(x[:3], 10, every, False, False)
    assert [h[0].id for h in hits] == [0, 1, 2]  # re-ranked with the originals: each finds itself
    store.close()
