"""Dynamic micro-batching: concurrent lone searches on one collection go through the shortlist
and the decoder as one batch (in process, a batch of 200 queries costs about a fifth per query
of 200 lone ones).

Group commit, for reads: a request queues its search; when no batch is running it runs every
search queued so far itself, grouped by their options (limit, params, filter, ...), and wakes
the requests it answered; otherwise it waits, and what queues up meanwhile forms the next batch.
A lone request runs at once, so batching adds no delay; under load, batches grow with it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class PendingSearch:
    search: Any  # an engine Query
    key: str  # its options: searches with the same key share one call
    hits: list | None = None
    error: Exception | None = None
    done: bool = False


class SearchBatcher:
    """One batch in flight per set of options: searches with other options run beside it, in
    their own threads, as they did unbatched."""

    def __init__(self, run_group: Callable[[list], list], observe_batch: Callable[[int], None] = lambda n: None):
        """run_group(searches sharing their options) -> one hit list per search."""
        self._run_group, self._observe_batch = run_group, observe_batch
        self._cond = threading.Condition()  # a leaf lock (engine/concurrency.py): it takes no other
        self._queues: dict[str, list[PendingSearch]] = {}  # options -> searches waiting (no key without one)
        self._running: set[str] = set()

    def search(self, search, key: str) -> list:
        pending = PendingSearch(search, key)
        with self._cond:
            self._queues.setdefault(key, []).append(pending)
            while not pending.done:
                if key in self._running:
                    self._cond.wait()
                    continue
                self._running.add(key)
                batch = self._queues.pop(key)
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._running.discard(key)
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        return pending.hits

    def _run(self, batch: list[PendingSearch]):
        try:
            self._observe_batch(len(batch))
            try:
                for pending, hits in zip(batch, self._run_group([p.search for p in batch]), strict=True):
                    pending.hits = hits
            except Exception as e:
                if len(batch) == 1:
                    batch[0].error = e
                else:
                    for pending in batch:  # one bad search must not fail the others: each alone, its own answer
                        try:
                            pending.hits = self._run_group([pending.search])[0]
                        except Exception as e1:
                            pending.error = e1
        finally:
            for pending in batch:
                if pending.hits is None and pending.error is None:
                    pending.error = RuntimeError("the batch this search was part of did not finish")
                pending.done = True
