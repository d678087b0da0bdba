"""The engine's seams: its concurrency (no lost update, the lock order checked), its layout (no
import cycles, small modules, model/ free of service/)."""

import ast
import threading
from pathlib import Path

import numpy as np
import pytest

from service.engine.concurrency import INDEX, WRITE, LockOrderError, OrderedLock, ReadWriteLock
from service.engine.registry import Store
from service.engine.snapshots import Snapshots

ROOT = Path(__file__).resolve().parents[1]


class HeldCounter:
    """`Snapshots.changed` with a forced interleaving: the first read by thread A waits (up to 2 s)
    until thread B has written it, as a read-modify-write preempted between its read and its write."""

    def __init__(self):
        self.value = 0
        self.first_read, self.second_wrote = threading.Event(), threading.Event()

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = self.value
        if threading.current_thread().name == "A" and not self.first_read.is_set():
            self.first_read.set()
            self.second_wrote.wait(2)  # where the write lock guards the counter, B waits for A: a timeout
        return value

    def __set__(self, obj, value):
        self.value = value
        if threading.current_thread().name == "B":
            self.second_wrote.set()


def test_the_snapshot_counter_loses_no_update(data_dir, vectors):
    """Two deletes count their points towards the next snapshot at the same moment: both count.
    (Before the fix, the count ran after the write lock was released: 5 of the 8 were kept.)"""
    store = Store(data_dir, snapshot_every=10**9, fast_ingest=False)
    c = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    c.upsert(list(range(8)), vectors[:8], [None] * 8)
    counter = HeldCounter()
    c.snapshots.__class__ = type("HeldSnapshots", (Snapshots,), {"changed": counter})
    a = threading.Thread(target=c.delete, args=([0, 1, 2, 3, 4],), name="A")
    b = threading.Thread(target=c.delete, args=([5, 6, 7],), name="B")
    a.start()
    assert counter.first_read.wait(30)
    b.start()
    a.join(30)
    b.join(30)
    assert counter.value == 8
    store.close()


def test_a_deleted_collection_gives_its_memory_back_at_once(data_dir, vectors):
    """Its parts refer to each other, so only the cycle collector frees them: the delete runs it
    (before, an 80 MiB index stayed until the collector's next full pass, whenever that came)."""
    import gc
    import weakref
    store = Store(data_dir, snapshot_every=10**9, fast_ingest=True)
    c = store.create("c", "l2", "balanced", data_dir / "models" / "ivf.safetensors")
    c.upsert(list(range(50)), vectors[:50], [None] * 50)  # fast codes: its refiner thread runs
    index = weakref.ref(c.spaces[""].index)
    del c
    gc.disable()  # no automatic pass may do the delete's work
    try:
        store.delete("c")
        assert index() is None
    finally:
        gc.enable()
        store.close()


def test_a_delete_answers_while_a_refiner_ends_its_batch():
    """A refiner still encoding after the wait is waited for in a thread of its own, which then frees."""
    import gc
    import weakref
    from service.engine.registry import _free

    class Part:  # a collection's parts: a cycle
        pass
    a, b = Part(), Part()
    a.other, b.other = b, a
    freed, batch_done = weakref.ref(a), threading.Event()
    refiner = threading.Thread(target=batch_done.wait, daemon=True)
    refiner.start()
    del a, b
    gc.disable()
    try:
        _free("c", [refiner], wait=0.01)  # returns at once
        helper = next(t for t in threading.enumerate() if t.name == "free-c")
        assert freed() is not None and helper.is_alive()
        batch_done.set()
        helper.join(30)
        assert freed() is None
    finally:
        gc.enable()


def test_closing_waits_for_a_read_in_progress_then_refuses_reads(data_dir, vectors):
    """A reader's connection closed by another thread in the middle of a query crashed the process
    (a refiner reading its queue while the store closed, once in six CI runs): `close` waits for it."""
    import time
    from service.errors import NotFound
    store = Store(data_dir, snapshot_every=10**9, fast_ingest=False)
    c = store.create("c", "l2", "fast", data_dir / "models" / "ivf.safetensors")
    c.upsert(list(range(20)), vectors[:20], [None] * 20)
    record, reading, events = c.record, threading.Event(), []

    def slow(i):  # a query that is still running when the close starts
        reading.set()
        time.sleep(0.2)
        return i

    def read():
        with record.reading() as db:
            db.create_function("slow", 1, slow)
            rows = db.execute("SELECT slow(id) FROM points ORDER BY id LIMIT 3").fetchall()
            events.append(("read", len(rows)))  # under the reader's lock: ordered before the close

    reader = threading.Thread(target=read)
    reader.start()
    assert reading.wait(30)
    store.close()
    events.append(("closed", None))
    reader.join(30)
    assert events == [("read", 3), ("closed", None)]
    with pytest.raises(NotFound):
        with record.reading():
            pass


def test_a_lock_taken_out_of_order_is_refused():
    write, index = OrderedLock(WRITE, "write lock"), ReadWriteLock(INDEX, "index lock")
    with write, index.read():  # the order
        pass
    with index.write():
        with pytest.raises(LockOrderError, match="write lock .* while holding index lock"):
            with write:
                pass
        with pytest.raises(LockOrderError):
            with index.read():  # not even the same lock twice: a waiting writer would deadlock it
                pass
    with write:  # both free again
        pass


def imports_of(path: Path, package: str) -> set[str]:
    """The project modules a module imports (absolute names)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for annotations: never run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, `level` steps up
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("model", "service")}


def project_modules() -> dict[str, Path]:
    modules = {}
    for top in ("model", "service"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_no_import_cycles_and_model_stays_the_math():
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in imports_of(path, package) if m in modules and m != name}
    for name, deps in graph.items():
        if name.startswith("model"):
            assert not [d for d in deps if d.startswith("service")], f"{name} imports the service"
    for name in graph:  # depth-first search for a path back to the start
        stack, seen = [(name, [name])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                assert dep != name, "import cycle: " + " -> ".join(path + [dep])
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))


def test_service_modules_stay_small():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in (ROOT / "service").rglob("*.py")}
    assert max(sizes.values()) <= 400, {str(p): n for p, n in sizes.items() if n > 400}


def test_a_search_budget_names_its_own_limits():
    from service.engine.search import SearchBudget
    from service.errors import BadRequest
    budget = SearchBudget(1000, vector_values=500)
    with pytest.raises(BadRequest, match="more than 500 vector values"):
        budget.take(1, 10, 0, True, 100)
    with pytest.raises(BadRequest, match="more than 1000 search candidates"):
        budget.take(2, 10, 600, False, 100)
    budget.take(1, 50, 0, True, 100, returned=5)  # 50 candidates, 5 of them returned with their vectors
    assert (budget.candidates, budget.vector_values) == (950, 0)
    budget = SearchBudget(10**6, originals=1000)
    budget.take_originals(2, 5, 100)  # 2 queries rescoring 5 candidates of 100 dimensions
    with pytest.raises(BadRequest, match="more than 1000 original vector values"):
        budget.take_originals(1, 1, 1)


@pytest.mark.parametrize("scattered", [False, True])
def test_the_point_set_stays_sorted_through_appends_inserts_and_removes(scattered):
    """Ids in runs stay a roaring bitmap; random 62-bit ids (a 64K chunk each) become a sorted array."""
    from service.engine.ids import MIN_JUDGED, PointSet
    rng = np.random.default_rng(0)
    start = rng.integers(0, 1 << 62, MIN_JUDGED) if scattered else np.arange(10**6, 10**6 + MIN_JUDGED)
    points, expected = PointSet(start), set(start.tolist())
    assert (points._bitmap is None) == scattered  # a bitmap of scattered ids would cost more than 8 bytes an id
    views = []
    for step in range(600):
        if step % 3 == 0:  # new ids above every stored one
            top = max(expected) + 1
            ids = np.arange(top, top + 10)
        else:
            ids = rng.integers(0, 5000, rng.integers(0, 20))
        if step % 5 == 4:
            points.remove(np.concatenate([ids, [-1]]))
            expected -= set(ids.tolist())
        else:
            points.add(ids)
            expected |= set(ids.tolist())
        if step % 50 == 0:
            assert points.ids.tolist() == sorted(expected) and len(points) == len(expected)
            views.append((points.ids, points.ids.copy()))
    assert points.ids.tolist() == sorted(expected) and len(points) == len(expected)
    assert all((view == copy).all() for view, copy in views)  # what a reader holds never changes
    ordered = sorted(expected)
    probe = np.array(ordered[:3] + [-1, (1 << 62) + 1])
    assert points.contains(probe).tolist() == [True, True, True, False, False]
    assert points.page(None, 4) == ordered[:4]
    assert points.page(ordered[10] + 1, 3) == ordered[11:14]  # a scroll offset that is no id
    assert points.page(ordered[-1] + 1, 3) == [] and points.page(-5, 1) == ordered[:1]


def test_the_point_set_holds_its_ids_as_whichever_costs_less():
    from service.engine.ids import PointSet
    scattered = np.unique(np.random.default_rng(0).integers(0, 10**9, 5000))
    points = PointSet(scattered)
    assert points._bitmap is None  # a 64K-id chunk for about every id: the array
    points.add(np.arange(10**9, 10**9 + 20_000))  # appended in place, then judged: still too scattered
    assert points._bitmap is None
    points.add(np.arange(10**9 + 20_000, 10**9 + 120_000))
    assert points._bitmap is not None  # mostly runs now
    assert points.ids.tolist() == sorted(scattered.tolist()) + list(range(10**9, 10**9 + 120_000))
    points.remove(np.arange(10**9, 10**9 + 120_000))  # judged again after as many adds as are left
    points.add(np.unique(np.random.default_rng(1).integers(0, 1 << 62, 5000)))
    assert points._bitmap is None and len(points) == len(scattered) + 5000


def test_code_blobs_convert_a_chunk_at_a_time_and_read_back():
    from service.engine.sql import array_of, blobs_of
    codes = np.random.default_rng(0).integers(0, 256, (1001, 9)).astype(np.int64)  # as an index returns them
    blobs = list(blobs_of(codes, chunk=64))
    assert len(blobs) == 1001 and (array_of(blobs, np.int32, 9) == codes).all()
    assert list(blobs_of(codes[:0])) == []
