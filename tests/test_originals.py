"""Originals on disk (service/engine/originals.py): an append-only file per vector space, read with
pread (mapped only for the exact index's scans), its rows mapped by the record; durable before a write's commit, kept as
float32 or float16, moved out of the record's blobs once, dropped with a new generation."""

import gc
import signal
import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest

from service.engine import search
from service.engine.originals import OriginalsFile
from service.engine.registry import Store
from tests.server import free_port, serve
from tests.test_crash import writer

SETTINGS = {"bytes": 4, "train_after": 0, "train_minutes": 0.05, "keep_originals": True, "nlist": None}


def new_collection(tmp_path, **kw):
    """An open store with a self-training collection "s" (50-d, l2): (store, collection)."""
    store = Store(tmp_path, **kw.pop("store", {}))
    store.open_all()
    return store, store.create("s", "l2", "balanced", size=50, qinco={**SETTINGS, **kw.pop("qinco", {})}, **kw)


def originals_files(folder):
    return sorted(p.name for p in folder.glob("originals*-*.f*"))


def test_a_file_appends_reads_and_cuts_off_what_did_not_commit(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    f = OriginalsFile(tmp_path, "originals", 6, "float32", 0, 0)
    assert np.array_equal(f.append(x[:4]), np.arange(4))
    f.sync()
    f.committed()
    assert np.array_equal(f.read(np.array([3, 0])), x[[3, 0]])
    assert np.array_equal(f.append(x[4:7]), np.arange(4, 7))
    f.rolled_back()  # that transaction did not commit: its rows are written over
    assert np.array_equal(f.append(x[7:9]), np.arange(4, 6))
    f.sync()
    f.committed()
    assert np.array_equal(f.read(np.arange(6)), x[[0, 1, 2, 3, 7, 8]])
    f.append(x[9:])  # written, never committed
    del f
    assert (tmp_path / "originals-0.f32").stat().st_size == 7 * 6 * 4
    f = OriginalsFile(tmp_path, "originals", 6, "float32", 0, 6)  # the record says 6 rows
    assert (tmp_path / "originals-0.f32").stat().st_size == 6 * 6 * 4
    with pytest.raises(ValueError, match="past the end"):
        f.read(np.array([6]))
    del f
    with pytest.raises(ValueError, match="cut short"):
        OriginalsFile(tmp_path, "originals", 6, "float32", 0, 7)
    f = OriginalsFile(tmp_path, "originals", 6, "float32", 1, 0)  # the next generation's
    assert originals_files(tmp_path) == ["originals-0.f32", "originals-1.f32"]  # until the record names it
    f.remove_others()
    del f
    assert originals_files(tmp_path) == ["originals-1.f32"]


@pytest.mark.parametrize("datatype, itemsize, tolerance", [("float32", 4, 0.0), ("float16", 2, 1e-3)])
def test_a_collection_keeps_its_originals_in_the_file(tmp_path, glove_sample, datatype, itemsize, tolerance):
    x = glove_sample[:500]
    store, c = new_collection(tmp_path, datatype=datatype)
    c.upsert(list(range(300)), x[:300], [None] * 300)
    c.upsert(list(range(250, 500)), x[250:], [None] * 250)  # 50 replaced: their old rows stay, unmapped
    c.delete([0, 1])
    folder = tmp_path / "collections" / "s"
    assert originals_files(folder) == ["originals-0." + {"float32": "f32", "float16": "f16"}[datatype]]
    assert (folder / originals_files(folder)[0]).stat().st_size == 550 * 50 * itemsize
    assert c.record.db.execute("SELECT count(*) FROM original_rows").fetchone()[0] == 498
    assert not c.record.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'originals'").fetchone()
    got = c.space.record.originals([0, 5, 260, 499])
    assert sorted(got) == [5, 260, 499]
    assert max(np.abs(got[i] - x[i]).max() for i in got) <= tolerance
    reader = threading.Thread(target=c.space.record.originals, args=([5],))  # another thread's reader
    reader.start()
    reader.join()
    readers = [r.conn for r in c.record._readers]
    assert len(readers) >= 2  # this thread's, the other's (and any background thread's)
    store.close()
    for conn in readers:  # closed with the record, though the threads may live on
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    store = Store(tmp_path)  # reopened: the exact index reads the file
    store.open_all()
    c = store.get("s")
    assert c.count() == 498 and c.info()["vectors"][""]["datatype"] == datatype
    hits = c.search(x[[7, 400]], 1, {}, False, False)
    assert [h[0].id for h in hits] == [7, 400]
    store.close()


def test_blob_originals_of_an_older_record_move_to_the_file(tmp_path, glove_sample):
    x = glove_sample[:300]
    store, c = new_collection(tmp_path)
    c.upsert(list(range(300)), x, [None] * 300)
    store.close()
    folder = tmp_path / "collections" / "s"
    db = sqlite3.connect(folder / "points.sqlite")  # the record as an older version wrote it
    with db:
        db.execute("CREATE TABLE originals (id INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
        db.executemany("INSERT INTO originals VALUES (?, ?)", [(i, x[i].tobytes()) for i in range(300)])
        db.execute("DROP TABLE original_rows")
        db.execute("DELETE FROM meta WHERE key LIKE 'originals_%'")
    db.close()
    (folder / "originals-0.f32").unlink()
    store = Store(tmp_path)
    store.open_all()
    c = store.get("s")
    assert c.count() == 300 and originals_files(folder) == ["originals-0.f32"]
    assert not c.record.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'originals'").fetchone()
    got = c.space.record.originals(range(300))
    assert np.array_equal(np.stack([got[i] for i in range(300)]), x)
    assert [h[0].id for h in c.search(x[[11]], 1, {}, False, False)] == [11]
    store.close()
    store = Store(tmp_path)  # and again: the move committed its rows
    store.open_all()
    got = store.get("s").space.record.originals(range(300))
    assert np.array_equal(np.stack([got[i] for i in range(300)]), x)
    store.close()


def test_a_swap_without_keep_originals_drops_the_file(tmp_path, glove_sample):
    x = glove_sample[:1200]
    store, c = new_collection(tmp_path, store={"train_threads": 1}, qinco={"keep_originals": False})
    c.upsert(list(range(1200)), x, [None] * 1200)
    folder = tmp_path / "collections" / "s"
    assert originals_files(folder) == ["originals-0.f32"]
    c.start_training()
    deadline = time.time() + 180
    while c.space.job is not None and time.time() < deadline:
        time.sleep(0.2)
    assert c.space.generation == 1 and c.qinco_status()["originals"] == 0
    assert originals_files(folder) == ["originals-1.f32"] and (folder / "originals-1.f32").stat().st_size == 0
    assert c.space.record.originals([3]) == {}
    c.upsert([5000], x[:1], [None])  # codes only from now on
    assert c.space.record.originals([5000]) == {}
    store.close()
    store = Store(tmp_path)
    store.open_all()
    assert store.get("s").count() == 1201 and originals_files(folder) == ["originals-1.f32"]
    store.close()


def mapped(path) -> bool:
    """Whether this process maps the file."""
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


def test_reads_copy_rows_and_only_the_exact_index_maps_the_file(tmp_path, glove_sample, monkeypatch):
    """A rescore or a retrieve reads rows with pread (no map: its pages would stay in the server's
    RSS); the exact index of a space without a model scans a map, which goes with that index."""
    x = glove_sample[:1200]
    f = OriginalsFile(tmp_path, "originals", 50, "float32", 0, 0)
    f.append(x[:40])
    f.sync()
    f.committed()
    rows = np.array([39, 3, 4, 5, 3, 0, 20, 21])  # runs, repeats, out of order
    assert np.array_equal(f.read(rows), x[rows]) and np.array_equal(f.read(np.arange(5, 9)), x[5:9])
    assert f.read([]).shape == (0, 50) and not mapped(f.path)
    with pytest.raises(ValueError, match="past the end"):
        f.read(np.array([2, 40]))
    del f

    store, c = new_collection(tmp_path / "store", store={"train_threads": 1})
    c.upsert(list(range(1200)), x, [None] * 1200)
    path = c.space.record.file.path
    assert [h[0].id for h in c.search(x[[7]], 1, {}, False, False)] == [7] and mapped(path)  # exact: a map
    c.start_training()
    deadline = time.time() + 180
    while c.space.job is not None and time.time() < deadline:
        time.sleep(0.2)
    assert c.space.generation == 1 and c.space.record.file.path == path
    gc.collect()
    assert not mapped(path)  # gone with the exact index
    hits = c.search(x[[7]], 3, {"rescore": True, "oversampling": 4}, False, False)[0]
    assert hits[0].id == 7 and np.array_equal(c.space.record.originals([7])[7], x[7]) and not mapped(path)
    # A batch is rescored a block of queries at a time (bounded memory), with the same hits.
    whole = c.search(x[100:150], 5, {"rescore": True}, False, False)
    assert sum(h[0].id == 100 + q for q, h in enumerate(whole)) >= 45
    monkeypatch.setattr(search, "RESCORE_BLOCK_VALUES", 3 * search.RESCORE_SHORTLIST * 50)  # 3 queries a block
    blocks, block = [], search._rescored_block
    monkeypatch.setattr(search, "_rescored_block", lambda space, q, I: blocks.append(len(q)) or block(space, q, I))
    assert c.search(x[100:150], 5, {"rescore": True}, False, False) == whole
    assert blocks == [3] * 16 + [2]
    store.close()


def test_a_file_mostly_of_replaced_vectors_is_compacted_at_a_snapshot(tmp_path, glove_sample, monkeypatch):
    from service.engine import snapshots
    monkeypatch.setattr(snapshots, "COMPACT_AFTER", 100)
    x = glove_sample[:900]
    store, c = new_collection(tmp_path)
    for k in range(3):  # the same 300 ids, three times: 600 dead rows
        c.upsert(list(range(300)), x[300 * k:300 * (k + 1)], [None] * 300)
    c.delete([7])
    folder = tmp_path / "collections" / "s"
    assert c.space.record.dead_originals() == 601
    c.snapshots.write()
    assert originals_files(folder) == ["originals-1.f32"] and c.space.record.dead_originals() == 0
    runs = c.space.record.row_runs  # read again: row = the id's rank in the new file
    assert runs.generation == 1 and runs.runs.starts.tolist() == [0, 8] and runs.runs.rows.tolist() == [0, 7]
    assert (folder / "originals-1.f32").stat().st_size == 299 * 50 * 4
    got = c.space.record.originals(range(300))
    assert sorted(got) == [i for i in range(300) if i != 7]
    assert all(np.array_equal(got[i], x[600 + i]) for i in got)
    # the exact search (no model yet) reads the new file at the new rows
    assert c.space.index.flat.source.file is c.space.record.file
    assert [h[0].id for h in c.search(x[[650]], 1, {}, False, False)] == [50]
    c.upsert([7], x[:1], [None])  # appends after the compacted rows
    assert np.array_equal(c.space.record.originals([7])[7], x[0])
    hit = c.search(x[[0]], 1, {}, False, True)[0][0]
    assert hit.id == 7 and hit.score == 0 and np.array_equal(hit.vector, x[0])
    store.close()
    store = Store(tmp_path)
    store.open_all()
    c = store.get("s")
    assert c.count() == 300 and [h[0].id for h in c.search(x[[650]], 1, {}, False, False)] == [50]
    store.close()


def test_originals_are_durable_before_the_commit(tmp_path, glove_sample, monkeypatch):
    from service.engine import originals
    store, c = new_collection(tmp_path)
    synced = []
    real = originals.os.fdatasync
    monkeypatch.setattr(originals.os, "fdatasync",
                        lambda fd: (synced.append((c.record.db.in_transaction, c.space.record.file.end)), real(fd)))
    c.upsert(list(range(10)), glove_sample[:10], [None] * 10)
    assert synced == [(True, 10)]  # in the transaction, before its COMMIT
    assert c.record.db.execute("SELECT value FROM meta WHERE key = 'originals_rows'").fetchone()[0] == 10
    c.delete([3])  # no original written: no sync
    assert len(synced) == 1
    store.close()


def test_float16_originals_refuse_values_they_cannot_hold(tmp_path, glove_sample):
    from service.errors import BadRequest
    store, c = new_collection(tmp_path, datatype="float16")
    x = glove_sample[:2].copy()
    x[1, 3] = 70_000.0
    with pytest.raises(BadRequest, match="float16"):
        c.upsert([0, 1], x, [None, None])
    assert c.count() == 0 and c.space.record.file.end == 0
    store.close()


def test_readers_never_see_wrong_rows_while_the_file_is_compacted_or_dropped(tmp_path, glove_sample, monkeypatch):
    from service.engine import snapshots
    monkeypatch.setattr(snapshots, "COMPACT_AFTER", 50)
    x = glove_sample[:1000]
    store, c = new_collection(tmp_path)
    c.upsert(list(range(100)), x[:100], [None] * 100)
    stop, wrong, reads = threading.Event(), [], [0]

    def read():
        while not stop.is_set():
            got = c.space.record.originals(range(100))
            reads[0] += 1
            # each id holds one of the vectors written for it (id i: row i + 100 k)
            wrong.extend(i for i, v in got.items() if not any(np.array_equal(v, x[i + 100 * k]) for k in range(10)))
    def search():  # the exact search (no model yet) scores each hit by one of its own vectors
        rng = np.random.default_rng(0)
        while not stop.is_set():
            q = x[rng.integers(0, 1000)]
            for hit in c.search(q[None], 5, {}, False, False)[0]:
                own = x[hit.id::100]  # the vectors written for this id
                if not np.isclose(np.sqrt(((own - q) ** 2).sum(1)), hit.score, atol=1e-3).any():
                    wrong.append(("search", hit.id))
            reads[0] += 1
    readers = [threading.Thread(target=read) for _ in range(2)] + [threading.Thread(target=search)]
    for t in readers:
        t.start()
    try:
        for k in range(1, 10):  # each rewrite leaves 100 dead rows: compacted at every other snapshot
            c.upsert(list(range(100)), x[100 * k:100 * (k + 1)], [None] * 100)
            c.snapshots.write()
        generation = c.space.record.file.generation
        with c.record.transaction():
            c.space.record.drop_originals()
        time.sleep(0.2)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert generation >= 3 and c.space.record.file.generation == generation + 1
    assert not wrong and reads[0] > 10
    assert c.space.record.originals(range(100)) == {}
    store.close()


def test_a_write_that_fails_before_its_commit_leaves_no_original(tmp_path, glove_sample):
    x = glove_sample[:20]
    store, c = new_collection(tmp_path)
    c.upsert(list(range(10)), x[:10], [None] * 10)
    with pytest.raises(ZeroDivisionError):
        with c.record.write():
            c.space.record.put_originals([10, 11], x[10:12])
            1 / 0
    c.upsert([12], x[12:13], [None])  # written over the rows that did not commit
    got = c.space.record.originals([10, 11, 12])
    assert sorted(got) == [12] and np.array_equal(got[12], x[12])
    store.close()
    store = Store(tmp_path)  # opening cuts off the rows past the committed ones
    store.open_all()
    assert (tmp_path / "collections/s/originals-0.f32").stat().st_size == 11 * 50 * 4
    assert store.get("s").count() == 11
    store.close()


def test_row_runs_follow_puts_and_deletes_as_the_table_does():
    """Random batches of puts (later duplicates win) and deletes, against a dict."""
    from service.engine.row_runs import RowRuns
    rng = np.random.default_rng(0)
    runs, table, next_row = RowRuns.empty(), {}, 0
    for step in range(300):
        if rng.random() < 0.7:  # an upsert: ascending ids from somewhere, sometimes shuffled or repeated
            ids = rng.integers(0, 400) + np.arange(rng.integers(1, 40))
            ids = rng.permutation(ids) if rng.random() < 0.2 else ids
            ids = np.concatenate([ids, ids[:2]]) if rng.random() < 0.2 else ids
            rows = np.arange(next_row, next_row + len(ids))
            next_row += len(ids)
            table.update(zip(ids.tolist(), rows.tolist()))
        else:
            ids, rows = rng.integers(0, 450, rng.integers(1, 30)), None
            for i in ids.tolist():
                table.pop(i, None)
        runs = runs.with_changes(ids, rows)
        assert np.all(runs.lengths > 0) and np.all(runs.starts[1:] >= runs.starts[:-1] + runs.lengths[:-1])
        asked = np.arange(-5, 500)
        found, found_rows = runs.lookup(asked)
        assert dict(zip(found.tolist(), found_rows.tolist())) == table, step
    assert len(runs) < len(table)  # runs, not a run per id
    assert len(RowRuns.empty().with_changes(np.arange(0, 4000, 2), np.arange(2000)).lookup(np.arange(4000))[0]) == 2000
    top = np.iinfo(np.int64).max  # a run through the largest id would end past int64: no map
    assert RowRuns.empty().with_changes(np.array([top - 1, top]), np.arange(2)) is None


def test_a_rescore_finds_rows_in_the_runs_and_sqlite_answers_for_scattered_ids(tmp_path, glove_sample, monkeypatch):
    from service.engine import row_runs, space_record
    x = glove_sample[:600]
    store, c = new_collection(tmp_path)
    for i0 in range(0, 400, 100):
        c.upsert(list(range(i0, i0 + 100)), x[i0:i0 + 100], [None] * 100)
    c.upsert([5, 6], x[500:502], [None] * 2)
    c.delete([7])
    known = c.space.record.row_runs
    assert known is not None and len(known.runs) == 3  # 0-4, 5-6 (rows 400-401), 8-399
    expected = {i: x[i] for i in range(400) if i not in (5, 6, 7)} | {5: x[500], 6: x[501]}

    def no_sql(*a):
        raise AssertionError("read from SQLite")
    with monkeypatch.context() as m:  # the runs answer: not one look-up in SQLite
        m.setattr(space_record, "select_by_ids", no_sql)
        got = c.space.record.originals(range(-1, 401))
    assert got.keys() == expected.keys() and all(np.array_equal(got[i], expected[i]) for i in got)
    with c.record.write():  # a transaction not yet committed: its readers use SQLite, as of before it
        c.space.record.put_originals([1000], x[550:551])
        assert 1000 not in threading_read(c.space.record.originals, [1000, 3])
    assert np.array_equal(c.space.record.originals([1000])[1000], x[550])
    store.close()
    store = Store(tmp_path)  # opening reads the runs again
    store.open_all()
    c = store.get("s")
    assert len(c.space.record.row_runs.runs) == 4
    got = c.space.record.originals(range(1001))
    assert got.keys() == expected.keys() | {1000} and np.array_equal(got[6], x[501])
    monkeypatch.setattr(row_runs, "MAX_RUNS", 5)  # scattered ids: SQLite answers
    c.upsert([2000, 2002, 2004], x[560:563], [None] * 3)
    assert c.space.record.row_runs is None
    got = c.space.record.originals([2002, 6, 7])
    assert sorted(got) == [6, 2002] and np.array_equal(got[2002], x[561])
    store.close()


def threading_read(read, *args):
    """`read(*args)` on another thread (its own reader connection)."""
    out = []
    t = threading.Thread(target=lambda: out.append(read(*args)))
    t.start()
    t.join()
    return out[0]


def test_kill_9_loses_no_acknowledged_original(tmp_path, glove_sample):
    """A collecting collection serves its originals: each acknowledged one is back, bit for bit."""
    store = Store(tmp_path)
    store.open_all()
    store.create("c", "l2", "balanced", size=50, qinco=SETTINGS)
    store.close()
    vectors = glove_sample[:2000]
    acked, attempted = [], []
    for round_ in range(3):
        port = free_port()
        proc = serve(tmp_path, port, "--no-demo")
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(f"http://127.0.0.1:{port}", vectors,
                                                         10**6 * (round_ * 4 + t + 1), acked, attempted, stop))
                   for t in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0 + round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
    assert len(acked) >= 3, "the clients got too few acknowledgements to test anything"
    port = free_port()
    proc = serve(tmp_path, port, "--no-demo")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for ids, rows in attempted:
                r = client.post("/collections/c/points", json={"ids": ids, "with_vector": True, "with_payload": False})
                got = {p["id"]: p["vector"] for p in r.json()["result"]}
                assert set(got) in (set(ids), set()), f"half-applied batch {ids[0]}.."
                if (ids, rows) in acked:
                    assert set(got) == set(ids), f"acknowledged batch {ids[0]}.. lost"
                for i, row in zip(ids, rows):
                    if i in got:
                        assert np.array_equal(np.array(got[i], dtype=np.float32), vectors[row])
    finally:
        proc.kill()
        proc.wait()
