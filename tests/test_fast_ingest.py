"""Fast ingest: upserts are acknowledged with `fast` codes, then re-encoded in the background with
the collection's encoder, unless the point was rewritten or deleted meanwhile."""

import os
import threading
import time

import numpy as np
import pytest

from model.io import save_model
from model.network import ENCODERS, encode
from service.engine.collection import Collection
from service.engine.index import QincoSpaceIndex
from service.engine.refine import Refiner
from service.engine.registry import Store


def codes_of(model, x, encoder: str) -> np.ndarray:
    return encode(model, x, ENCODERS[encoder]).astype(np.int32)


def stored(c: Collection) -> dict[int, np.ndarray]:
    """id -> codes as SQLite holds them; the index must hold the same."""
    rows = c.record.db.execute("SELECT id, codes FROM codes").fetchall()
    db = {i: np.frombuffer(b, dtype=np.int32) for i, b in rows}
    assert c.record.db.execute("SELECT count(*) FROM refine").fetchone()[0] == c.space.refiner.pending
    ids, codes = c.space.index.stored_codes()
    assert dict(zip(ids.tolist(), map(tuple, codes.tolist()))) == {i: tuple(v.tolist()) for i, v in db.items()}
    return db


def wait_refined(c: Collection, timeout: float = 60):
    deadline = time.time() + timeout
    while c.space.refiner.pending:
        assert time.time() < deadline, f"{c.space.refiner.pending} points still waiting to be refined"
        time.sleep(0.05)


@pytest.fixture
def gate(monkeypatch):
    """Holds the background refinement until set."""
    gate = threading.Event()
    batch = Refiner.refine_batch

    def held(self):
        gate.wait()
        return batch(self)

    monkeypatch.setattr(Refiner, "refine_batch", held)
    yield gate
    gate.set()


def create(tmp_path, ivf_model, **kw) -> tuple[Store, Collection]:
    """A collection whose encoder ("quality") changes the tiny model's `fast` codes."""
    save_model(ivf_model, tmp_path / "ivf.safetensors")
    store = Store(tmp_path / "data", **kw)
    return store, store.create("c", "l2", "quality", tmp_path / "ivf.safetensors")


def test_upserts_are_acknowledged_fast_and_refined_in_the_background(tmp_path, ivf_model, vectors, gate):
    store, c = create(tmp_path, ivf_model)
    x = vectors[:300]
    c.upsert(list(range(300)), x, [{"i": i} for i in range(300)])
    fast, better = codes_of(ivf_model, x, "fast"), codes_of(ivf_model, x, "quality")
    assert (fast != better).any(), "the test needs points whose codes the better encoder changes"
    db = stored(c)
    assert np.array_equal(np.stack([db[i] for i in range(300)]), fast)
    assert c.space.refiner.pending == 300 and c.info()["status"] == "yellow"
    refiner = next(t for t in threading.enumerate() if t.name == "refine-c")
    lower, deadline = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10), time.time() + 30
    while os.getpriority(os.PRIO_PROCESS, refiner.native_id) != lower:  # it lowers its own when it starts
        assert time.time() < deadline, "the refiner did not run below the caller's priority"
        time.sleep(0.01)

    # While held: rewrite 0..9 with other vectors, delete 10..19.
    y = vectors[300:310]
    c.upsert(list(range(10)), y, [None] * 10)
    c.delete(list(range(10, 20)))
    assert c.space.refiner.pending == 290  # the rewrites replaced their queue rows, the deletes removed theirs
    hits_before = c.search(x[50:51], 5, None, False, False)
    gate.set()
    wait_refined(c)

    db = stored(c)
    assert sorted(db) == [*range(10), *range(20, 300)]
    assert np.array_equal(np.stack([db[i] for i in range(10)]), codes_of(ivf_model, y, "quality"))
    assert np.array_equal(np.stack([db[i] for i in range(20, 300)]), better[20:])
    assert c.info()["status"] == "green" and c.info()["qinco"]["refine_pending"] == 0
    assert c.payloads([25])[25] == {"i": 25}  # refinement changes codes only
    assert c.search(x[50:51], 5, None, False, False)[0][0].id == hits_before[0][0].id == 50
    store.close()


def test_a_point_rewritten_while_its_batch_is_encoded_keeps_the_new_vector(tmp_path, ivf_model, vectors, monkeypatch):
    """The refiner encodes outside the lock; a rewrite that commits meanwhile wins (its seq)."""
    store, c = create(tmp_path, ivf_model)
    encoding, go_on = threading.Event(), threading.Event()
    codes = QincoSpaceIndex.encode

    def slow_in_refiner(self, x, encoder, workers=0):
        out = codes(self, x, encoder, workers)
        if threading.current_thread().name.startswith("refine-"):
            encoding.set()
            go_on.wait()
        return out

    monkeypatch.setattr(QincoSpaceIndex, "encode", slow_in_refiner)
    c.upsert([1, 2], vectors[:2], [None, None])
    assert encoding.wait(30)
    c.upsert([1], vectors[5:6], [None])  # commits while the refiner holds vector 0 for id 1
    go_on.set()
    wait_refined(c)
    db = stored(c)
    assert np.array_equal(db[1], codes_of(ivf_model, vectors[5:6], "quality")[0])
    assert np.array_equal(db[2], codes_of(ivf_model, vectors[1:2], "quality")[0])
    store.close()


def test_the_queue_survives_a_restart(tmp_path, ivf_model, vectors, gate):
    store, c = create(tmp_path, ivf_model)
    c.upsert(list(range(100)), vectors[:100], [None] * 100)
    store.close()
    gate.set()
    store = Store(tmp_path / "data", fast_ingest=False)  # turned off since: what is queued still drains
    store.open_all()
    c = store.get("c")
    wait_refined(c)
    db = stored(c)
    assert np.array_equal(np.stack([db[i] for i in range(100)]), codes_of(ivf_model, vectors[:100], "quality"))
    store.close()


def test_off_or_with_the_fast_encoder_nothing_is_queued(tmp_path, ivf_model, vectors):
    store, c = create(tmp_path, ivf_model, fast_ingest=False)
    c.upsert(list(range(50)), vectors[:50], [None] * 50)
    assert c.space.refiner.pending == 0
    db = stored(c)
    assert np.array_equal(np.stack([db[i] for i in range(50)]), codes_of(ivf_model, vectors[:50], "quality"))
    f = store.create("f", "l2", "fast", tmp_path / "ivf.safetensors")
    f.upsert(list(range(50)), vectors[:50], [None] * 50)
    assert not f.space.refiner.enabled and f.record.db.execute("SELECT count(*) FROM refine").fetchone()[0] == 0
    store.close()


def test_a_full_queue_makes_upserts_wait_for_the_better_codes(tmp_path, ivf_model, vectors, gate, monkeypatch):
    import service.engine.refine
    monkeypatch.setattr(service.engine.refine, "REFINE_QUEUE_BYTES", 100 * 50 * 4)  # 100 queued 50-d vectors
    store, c = create(tmp_path, ivf_model)
    c.upsert(list(range(100)), vectors[:100], [None] * 100)
    c.upsert(list(range(100, 150)), vectors[100:150], [None] * 50)  # the queue is full: no fast codes
    assert c.space.refiner.pending == 100
    db = stored(c)
    assert np.array_equal(np.stack([db[i] for i in range(100, 150)]), codes_of(ivf_model, vectors[100:150], "quality"))
    c.upsert([0], vectors[200:201], [None])  # rewritten with the better codes: its queued row goes
    assert c.space.refiner.pending == 99
    gate.set()
    wait_refined(c)
    db = stored(c)
    assert np.array_equal(db[0], codes_of(ivf_model, vectors[200:201], "quality")[0])
    store.close()


def test_the_count_never_dips_while_points_are_refined(tmp_path, ivf_model, vectors):
    """A refinement replaces codes (remove, then add): a count read meanwhile must not see the
    points gone (found by the qdrant-client UUID test in CI)."""
    store, c = create(tmp_path, ivf_model)
    for i0 in range(0, 400, 20):
        c.upsert(list(range(i0, i0 + 20)), vectors[i0:i0 + 20], [None] * 20)
        counts = []
        while c.space.refiner.pending:
            counts.append(c.count())
        assert set(counts) <= {i0 + 20}, counts
    store.close()


def test_the_refiners_of_several_collections_take_turns(tmp_path, ivf_model, glove_sample, gate, monkeypatch):
    """Each refiner encodes on every background thread: two collections' never encode at once
    (both held at the gate until both have work, then let go together)."""
    encode, running, most = QincoSpaceIndex.encode, [0], [0]
    lock = threading.Lock()

    def counted(self, x, encoder, workers=0):
        if threading.current_thread().name.startswith("refine-"):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.2)  # long enough for the other refiner to try
            with lock:
                running[0] -= 1
        return encode(self, x, encoder, workers)

    monkeypatch.setattr(QincoSpaceIndex, "encode", counted)
    store, c = create(tmp_path, ivf_model)
    d = store.create("d", "l2", "quality", tmp_path / "ivf.safetensors")
    x = glove_sample[4000:4600]
    for col in (c, d):
        col.upsert(list(range(600)), x, [None] * 600)  # 3 refine batches each
    gate.set()
    wait_refined(c)
    wait_refined(d)
    assert most[0] == 1
    assert np.array_equal(np.stack([stored(d)[i] for i in range(600)]), codes_of(ivf_model, x, "quality"))
    store.close()
