"""A collection's concurrency in one place: its locks, the order every thread takes them in, and
the background threads the engine starts.

Lock order: a thread holding a lock takes only locks of a higher rank.  OrderedLock checks it on
every acquire, so a change that could deadlock fails its first test with LockOrderError instead.

  1 REGISTRY  Store.lock: the data directory's collections (create, open, delete, close)
  2 SNAPSHOT  CollectionLocks.snapshot: one snapshot at a time; a close waits for it
  3 WRITE     CollectionLocks.write: orders the writers (SQLite commit, then the in-memory
              change); guards the space's model, job and training facts, and the refine and
              snapshot counters
  4 INDEX     CollectionLocks.index, readers-writer: the in-memory index and payload indexes;
              searches share it, a change takes it alone
  5 LEAF      a payload index build (PayloadIndexes.build_lock); outside this module, likewise
              taking no other lock: the scan's list copy (model/index.py), a field's numbers sorted
              by a reader (field_index.py), a job's process handle (service/training/job.py), the
              search batcher (service/http/batching.py), a thread's SQLite reader (record.py: a
              close waits for the read on it)

Encoding, SQLite reads and the training worker run outside every collection lock (the refiners
of all collections take turns to encode: refine.ENCODING_TURN, a leaf).

Threads, all daemons named after their collection (started by `start`):
  refine-NAME     re-encodes points acknowledged with fast codes (refine.py), at nice 10
  snapshot-NAME   writes a snapshot once snapshot_every points changed (snapshots.py)
  train-NAME      a training job: runs the worker process, then the swap (lifecycle.py)
  autotrain-NAME  starts a job once a collecting collection holds train_after points, or has outgrown its model (lifecycle.py)
  free-NAME       a deleted collection's: waits for its refiner's last batch, then frees it (registry.py)
A delete waits up to 2 s for the refiners outside every lock; they never take the registry's.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

REGISTRY, SNAPSHOT, WRITE, INDEX, LEAF = 1, 2, 3, 4, 5

_held = threading.local()  # (rank, name) of the ordered locks this thread holds


class LockOrderError(RuntimeError):
    pass


def _enter(rank: int, name: str):
    held = _held.__dict__.setdefault("locks", [])
    if held and max(r for r, _ in held) >= rank:
        top = max(held)
        raise LockOrderError(f"{name} (rank {rank}) taken while holding {top[1]} (rank {top[0]})")
    held.append((rank, name))


def _leave(rank: int, name: str):
    held = _held.locks
    del held[len(held) - 1 - held[::-1].index((rank, name))]


class OrderedLock:
    """A mutex with its rank in the lock order."""

    def __init__(self, rank: int, name: str):
        self.rank, self.name = rank, name
        self._lock = threading.Lock()

    def __enter__(self):
        _enter(self.rank, self.name)
        try:
            self._lock.acquire()
        except BaseException:
            _leave(self.rank, self.name)
            raise
        return self

    def __exit__(self, *exc):
        self._lock.release()
        _leave(self.rank, self.name)

    def locked(self) -> bool:
        return self._lock.locked()


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds new readers back."""

    def __init__(self, rank: int, name: str):
        self.rank, self.name = rank, name
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self):
        _enter(self.rank, self.name)
        try:
            with self._cond:
                while self._writer or self._waiting:
                    self._cond.wait()
                self._readers += 1
            try:
                yield
            finally:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()
        finally:
            _leave(self.rank, self.name)

    @contextmanager
    def write(self):
        _enter(self.rank, self.name)
        try:
            with self._cond:
                self._waiting += 1
                while self._writer or self._readers:
                    self._cond.wait()
                self._waiting -= 1
                self._writer = True
            try:
                yield
            finally:
                with self._cond:
                    self._writer = False
                    self._cond.notify_all()
        finally:
            _leave(self.rank, self.name)


class CollectionLocks:
    """The three locks of a collection, named by what they guard (the order above)."""

    def __init__(self):
        self.snapshot = OrderedLock(SNAPSHOT, "snapshot lock")
        self.write = OrderedLock(WRITE, "write lock")
        self.index = ReadWriteLock(INDEX, "index lock")


def start(kind: str, collection: str, target, *args) -> threading.Thread:
    """A background thread of a collection (the list above), started now."""
    thread = threading.Thread(target=target, args=args, daemon=True, name=f"{kind}-{collection}")
    thread.start()
    return thread
