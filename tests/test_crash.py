"""kill -9 a real `qinco serve` process during concurrent upserts; nothing acknowledged is lost.

With an encoder slower than `fast`, the kills also land in the background refinement (fast
ingest): after the restart it finishes, and every point holds its vector's codes.
"""

import signal
import threading
import time

import httpx
import numpy as np
import pytest

from model.io import save_model
from model.network import ENCODERS, encode
from service.engine.registry import Store
from tests.server import free_port, serve

ROUNDS, CLIENTS, BATCH = 3, 4, 25


def writer(url, vectors, first_id, acked, attempted, stop):
    with httpx.Client(base_url=url, timeout=30) as client:
        next_id = first_id
        while not stop.is_set():
            ids = list(range(next_id, next_id + BATCH))
            next_id += BATCH
            rows = np.random.default_rng(ids[0]).integers(0, len(vectors), BATCH)
            points = [{"id": i, "vector": vectors[r].tolist(), "payload": {"row": int(r)}} for i, r in zip(ids, rows)]
            attempted.append((ids, rows))
            try:
                r = client.put("/collections/c/points", json={"points": points})
            except httpx.HTTPError:
                return  # the server died mid-request: this batch is unacknowledged
            if r.status_code == 200:
                acked.append((ids, rows))
            time.sleep(0.05)  # a steady stream: the checks afterwards grow with the points written


@pytest.mark.parametrize("encoder", ["fast", "quality"])
def test_kill_9_during_concurrent_upserts_loses_nothing_acknowledged(tmp_path, ivf_model, glove_sample, encoder):
    save_model(ivf_model, tmp_path / "ivf.safetensors")
    store = Store(tmp_path)
    store.create("c", "l2", encoder, tmp_path / "ivf.safetensors")
    store.close()
    vectors = glove_sample[:2000]
    acked, attempted = [], []
    for round_ in range(ROUNDS):
        port = free_port()
        proc = serve(tmp_path, port, "--no-demo", env={"QINCO_SNAPSHOT_EVERY": "120"})
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(f"http://127.0.0.1:{port}", vectors,
                                                         10**6 * (round_ * CLIENTS + t + 1), acked, attempted, stop))
                   for t in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(1.5 + round_)  # die at a different moment each round
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
    assert len(acked) >= ROUNDS, "the clients got too few acknowledgements to test anything"

    port = free_port()
    proc = serve(tmp_path, port, "--no-demo")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            present = set()
            for ids, rows in attempted:  # every batch is all there or not at all
                r = client.post("/collections/c/points", json={"ids": ids, "with_payload": False})
                found = {p["id"] for p in r.json()["result"]}
                assert found in (set(ids), set()), f"half-applied batch {ids[0]}.."
                present.update(found)
            for ids, _ in acked:
                assert set(ids) <= present, f"acknowledged batch {ids[0]}.. lost"
            assert client.get("/collections/c/points/count").json()["result"]["count"] == len(present)
            # Acknowledged points are findable by their vectors (all lists probed, a wide shortlist).
            points = [(i, r) for ids, rows in acked for i, r in zip(ids, rows)]
            points = points[::max(1, len(points) // 1500)]  # a sample: each costs a 2,000-candidate search
            missing = []
            for p0 in range(0, len(points), 500):
                chunk = points[p0:p0 + 500]
                searches = [{"vector": vectors[r].tolist(), "limit": 100, "with_payload": False,
                             "params": {"nprobe": 16, "nshort": 2000}} for _, r in chunk]
                results = client.post("/collections/c/points/search/batch", json={"searches": searches}).json()
                missing += [i for (i, _), hits in zip(chunk, results["result"]) if i not in {h["id"] for h in hits}]
            assert not missing, f"{len(missing)} of {len(points)} acknowledged points not found, e.g. {missing[:5]}"
            deadline = time.time() + 120
            while client.get("/collections/c").json()["result"]["qinco"]["refine_pending"]:
                assert time.time() < deadline, "the refinement did not finish after the restart"
                time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    row_of = {i: r for ids, rows in attempted for i, r in zip(ids, rows)}
    store = Store(tmp_path)
    store.open_all()
    c = store.get("c")
    ids = sorted(present)
    db = dict(c.record.db.execute("SELECT id, codes FROM codes").fetchall())
    want = encode(ivf_model, vectors[[row_of[i] for i in ids]], ENCODERS[encoder]).astype(np.int32)
    assert np.array_equal(np.stack([np.frombuffer(db[i], dtype=np.int32) for i in ids]), want)
    stored_ids, stored_codes = c.space.index.stored_codes()
    order = np.argsort(stored_ids)
    assert np.array_equal(stored_ids[order], ids) and np.array_equal(stored_codes[order], want)
    store.close()
