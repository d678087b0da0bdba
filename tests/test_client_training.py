"""The SDK's self-training calls (issue #12) against a mocked transport: request shapes, wait_until_ready."""

import asyncio
import json

import httpx
import pytest

from qinco_client import (AsyncClient, Client, CollectionInfo, Conflict, NotFound, QincoStatus, TrainingFailed,
                          TrainingJob)


def mocked(handler, cls=Client):
    """A client whose requests go to handler(request) -> (status, result or error message)."""
    def answer(request: httpx.Request) -> httpx.Response:
        status, result = handler(request)
        if status >= 400:
            return httpx.Response(status, json={"status": {"error": result}, "time": 0.0})
        return httpx.Response(status, json={"result": result, "status": "ok", "time": 0.0})

    c = cls("http://qinco.test", retries=0)
    http = httpx.Client if cls is Client else httpx.AsyncClient
    c._qinco_http = http(base_url=c._qinco_url, transport=httpx.MockTransport(answer))
    return c


def job(phase, progress, kind="train"):
    return {"id": "j1", "kind": kind, "phase": phase, "progress": progress, "eta_seconds": 30 * (1 - progress),
            "started": 1.7e9, "minutes": 30.0, "points_encoded": 0, "points_total": 1000, "val_mse": None,
            "rq_val_mse": None}


def qinco(phase, job=None, last_error=None, points=1000):
    model = {"generation": 1, "val_mse": 0.1, "rq_val_mse": 0.12, "mse_vs_rq": 0.83, "trained_on": points,
             "bytes": 8, "nlist": 64}
    return {"phase": phase, "job": job, "model": model if phase == "ready" else None,
            "points_encoded": points if phase == "ready" else 0, "last_swap": None, "last_error": last_error,
            "train_after": 1000, "train_minutes": 30.0, "keep_originals": True, "originals": points,
            "bytes_per_point": {"memory": 8, "disk": 8 + 4 * 4}}


def info(phase, job=None, last_error=None, points=1000):
    status = "yellow" if job else {"collecting": "grey", "ready": "green"}.get(phase, "red")
    served = {"bytes_per_vector": 8, "nlist": 64, "encoder": "balanced", "tuned": False,
              "default_params": {"nprobe": 16, "ef_search": 64, "nshort": 100}} if phase == "ready" else {}
    return {"name": "c", "status": status, "dimension": 4, "metric": "cosine", "points_count": points,
            "config": {"params": {"vectors": {"size": 4, "distance": "Cosine"}}}, "payload_schema": {},
            **served, "qinco": qinco(phase, job, last_error, points)}


def polls(*infos):
    """A handler answering GETs with infos in turn (the last one repeated); it records what was asked."""
    seen = []

    def handler(request):
        seen.append((request.method, request.url.path, json.loads(request.content) if request.content else None))
        return 200, infos[min(len(seen) - 1, len(infos) - 1)]
    return handler, seen


TRAINING = [info("collecting", points=900), info("collecting", job=job("queued", 0.0)),
            info("training", job=job("training", 0.4)), info("encoding", job=job("encoding", 0.8)),
            info("ready")]


def test_create_self_training_collection_sends_qdrants_body():
    handler, seen = polls(info("collecting", points=0))
    with mocked(handler) as c:
        got = c.create_qinco_collection("c", 384, "cosine", bytes=16, train_after=20000, keep_originals=False)
        assert isinstance(got, CollectionInfo) and got.qinco.phase == "collecting" and got.nlist is None
        assert got.config["params"]["vectors"]["distance"] == "Cosine"  # Qdrant's fields kept as extras
        c.create_qinco_collection("d", size=8, distance="Euclid")
        c.create_qinco_collection("e", size=8, distance="l2", encoder="fast", train_minutes=2.5, nlist=0)
    assert [s for s in seen if s[0] == "PUT"] == [
        ("PUT", "/collections/c", {"vectors": {"size": 384, "distance": "Cosine"},
                                   "qinco": {"bytes": 16, "train_after": 20000, "keep_originals": False}}),
        ("PUT", "/collections/d", {"vectors": {"size": 8, "distance": "Euclid"}, "qinco": {}}),
        ("PUT", "/collections/e", {"vectors": {"size": 8, "distance": "Euclid"},
                                   "qinco": {"train_minutes": 2.5, "nlist": 0}, "encoder": "fast"})]


def test_create_from_a_model_keeps_the_old_body():
    handler, seen = polls(info("ready"))
    with mocked(handler) as c:
        c.create_qinco_collection("m", model="models/ivf.safetensors")
        c.create_qinco_collection("i", index="indexes/x.qinco", metric="cosine", encoder="fast")
    assert [s[2] for s in seen if s[0] == "PUT"] == [{"model": "models/ivf.safetensors", "metric": "l2"},
                                    {"index": "indexes/x.qinco", "encoder": "fast", "metric": "cosine"}]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "neither was given"),
    ({"size": 8, "distance": "Cosine", "model": "m"}, "not both"),
    ({"size": 8}, "needs both size and distance"),
    ({"size": 8, "distance": "Dot"}, "'Cosine' or 'Euclid'"),
    ({"size": 8, "distance": "Cosine", "metric": "l2"}, "metric is for the model/index form"),
    ({"model": "m", "bytes": 8, "train_after": 0}, "bytes, train_after: only for a collection that trains"),
])
def test_create_refuses_unclear_arguments_before_sending(kwargs, message):
    handler, seen = polls(info("ready"))
    with mocked(handler) as c, pytest.raises(ValueError, match=message):
        c.create_qinco_collection("x", **kwargs)
    assert seen == []


def test_train_and_cancel_request_shapes():
    started = qinco("collecting", job=job("queued", 0.0))
    handler, seen = polls(started, started, started, True)
    with mocked(handler) as c:
        status = c.train("c")
        assert isinstance(status, QincoStatus) and isinstance(status.job, TrainingJob)
        assert status.job.phase == "queued" and status.bytes_per_point.memory == 8 and status.model is None
        c.train("c", minutes=5, bytes=16, nlist=128)
        c.train("c", model="models/mine.safetensors")
        assert c.cancel_training("c") is True
        with pytest.raises(ValueError, match="not both"):
            c.train("c", minutes=5, model="models/mine.safetensors")
    assert seen == [("POST", "/collections/c/train", {}),
                    ("POST", "/collections/c/train", {"minutes": 5, "bytes": 16, "nlist": 128}),
                    ("POST", "/collections/c/train", {"model": "models/mine.safetensors"}),
                    ("DELETE", "/collections/c/train", None)]


def test_server_errors_on_train_are_the_clients_errors():
    with mocked(lambda r: (409, "a job is already running")) as c, pytest.raises(Conflict, match="already running"):
        c.train("c")
    with mocked(lambda r: (404, "no job")) as c, pytest.raises(NotFound, match="no job"):
        c.cancel_training("c")


def test_wait_until_ready_polls_through_the_phases(capsys):
    handler, seen = polls(*TRAINING)
    with mocked(handler) as c:
        ready = c.wait_until_ready("c", poll=0.001)
    assert ready.status == "green" and ready.qinco.phase == "ready" and ready.qinco.model.generation == 1
    assert ready.bytes_per_vector == 8 and len(seen) == 5 and {s[:2] for s in seen} == {("GET", "/collections/c")}
    bar = capsys.readouterr().err
    assert "c training" in bar and "c encoding" in bar and "ETA 18 s" in bar and "900/1000 points" in bar
    assert "c ready" in bar and "100%" in bar


def test_async_wait_until_ready_and_train():
    handler, seen = polls(qinco("collecting", job=job("queued", 0.0)), *TRAINING[1:])

    async def scenario():
        async with mocked(handler, AsyncClient) as c:
            assert (await c.train("c", minutes=1)).job.kind == "train"
            return await c.wait_until_ready("c", poll=0.001, progress=False)
    assert asyncio.run(scenario()).qinco.phase == "ready"
    assert seen[0] == ("POST", "/collections/c/train", {"minutes": 1}) and len(seen) == 5


def test_wait_until_ready_waits_for_a_retraining_job_on_a_ready_collection():
    handler, seen = polls(info("ready", job=job("encoding", 0.5)), info("ready"))
    with mocked(handler) as c:
        assert c.wait_until_ready("c", poll=0.001, progress=False).qinco.job is None
    assert len(seen) == 2


def test_wait_until_ready_times_out_clearly():
    handler, seen = polls(info("training", job=job("training", 0.25)))
    with mocked(handler) as c, pytest.raises(TimeoutError, match=r"'c' not ready after 0.05 s: training, "
                                                                r"job train training 25%"):
        c.wait_until_ready("c", timeout=0.05, poll=0.01, progress=False)
    assert 2 <= len(seen) <= 10

    async def scenario():
        async with mocked(polls(info("collecting", points=10))[0], AsyncClient) as c:
            await c.wait_until_ready("c", timeout=0.02, poll=0.005, progress=False)
    with pytest.raises(TimeoutError, match="collecting, no job, 10 points"):
        asyncio.run(scenario())


def test_wait_until_ready_raises_when_the_job_fails():
    handler, seen = polls(info("training", job=job("training", 0.5)),
                          info("collecting", last_error="out of memory"))
    with mocked(handler) as c, pytest.raises(TrainingFailed, match="'c' \\(collecting\\): training failed: "
                                                                   "out of memory"):
        c.wait_until_ready("c", poll=0.001, progress=False)
    assert len(seen) == 2

    async def scenario():
        async with mocked(polls(info("collecting", last_error="nan loss"))[0], AsyncClient) as c:
            await c.wait_until_ready("c", poll=0.001)
    with pytest.raises(TrainingFailed, match="nan loss"):
        asyncio.run(scenario())


def test_a_collection_from_a_model_is_ready_at_once():
    legacy = {k: v for k, v in info("ready").items() if k != "qinco"}
    handler, seen = polls(legacy)
    with mocked(handler) as c:
        assert c.wait_until_ready("c", progress=False).qinco is None
    assert len(seen) == 1
