"""Fast ingest: an upsert is encoded with the `fast` encoder and acknowledged; its vector waits in
the record's `refine` queue (same transaction) until the refiner thread re-encodes it with the
space's encoder and commits the better codes as a new write, unless the point was rewritten or
deleted meanwhile.  A swap re-encodes every point and empties the queue.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import numpy as np

from model.threads import background_thread

from ..training.policy import NICE
from . import concurrency
from .sql import array_of

if TYPE_CHECKING:  # annotations only: the collection imports this module
    from .collection import Collection
    from .space import VectorSpace

log = logging.getLogger("qinco.store")

REFINE_BATCH = 256  # points re-encoded per background commit
REFINE_QUEUE_BYTES = 1 << 30  # past this many queued vector bytes, upserts wait for the better codes
# Each refiner encodes on all the background encoding threads: those of several spaces take turns,
# a batch at a time, rather than each taking every core.
ENCODING_TURN = concurrency.OrderedLock(concurrency.LEAF, "encoding turn")


class Refiner:
    """The refine queue of a collection's vector space and the thread that drains it."""

    def __init__(self, collection: Collection, space: VectorSpace):
        self.c, self.space = collection, space
        self.enabled = collection.config.fast_ingest and space.encoder_name != "fast"
        self.pending = space.record.count("refine")  # queued points (write lock)
        self.wake = threading.Event()
        self.thread = None  # a deleted collection's memory returns once it ends (registry.py)
        if self.enabled or self.pending:  # a queue left by a run with fast ingest drains too
            name = collection.name if space.k == 0 else f"{collection.name}:{space.name}"
            self.thread = concurrency.start("refine", name, self.run)

    def acknowledges_fast(self) -> bool:
        """Whether an upsert now gets `fast` codes (the queue has room)."""
        return self.enabled and self.pending * 4 * self.space.dimension < REFINE_QUEUE_BYTES

    def run(self):
        """Re-encode queued points, oldest first, with the background encoding's threads and at the
        training job's lower priority."""
        c = self.c
        background_thread(c.config.encoding_threads, NICE)
        while True:
            self.wake.clear()  # before the checks: a wake-up after them is not lost
            if c.closing or c.closed:
                return
            try:
                busy = self.space.job is None and not c.broken and self.refine_batch()
            except Exception:
                if c.closing or c.closed:
                    return
                log.exception("%s: refining codes failed; trying again in 10 s", c.name)
                self.wake.wait(10)
                continue
            if not busy and not self.enabled and not self.pending:
                return  # what a run with fast ingest left is done
            if not busy:  # idle, or a job runs (its swap re-encodes every point)
                self.wake.wait(5)

    def refine_batch(self) -> bool:
        """Re-encode up to REFINE_BATCH queued points; False when none is queued."""
        c, space = self.c, self.space
        index = space.index
        rows = space.record.queued(REFINE_BATCH)
        if not rows:
            return False
        x = array_of([r[2] for r in rows], np.float32, space.dimension)
        with ENCODING_TURN:
            if c.closing or c.closed:  # closed while this refiner waited for its turn
                return False
            codes = index.encode(x, space.encoder, workers=1)  # this thread's own torch threads
        with c.locks.write:
            if c.closing or c.closed or c.broken:
                return False
            if space.model is not index.model:
                return True  # a swap re-encoded everything and emptied the queue
            with c.record.write() as w:
                done, removed = space.record.refine_codes([(i, s) for i, s, _ in rows], codes, w.seq)
                w.changed = any(done)
            ids = np.array([r[0] for r in rows], dtype=np.int64)[done]
            try:
                if len(ids):
                    c.apply(lambda: space.index.add(codes[done], ids))
            finally:  # counted once the index serves them: `pending == 0` means refined
                self.pending -= removed
            # Counted, not started here: a snapshot thread started from this one would inherit its
            # low priority while it holds the write lock.  The next write starts it.
            c.snapshots.changed += len(ids)
        return True
