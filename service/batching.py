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
class Job:
    search: Any  # schemas.SearchRequest
    key: str  # its options: jobs with the same key share one call
    hits: list | None = None
    error: Exception | None = None
    done: bool = False


class SearchBatcher:
    """One batch in flight per set of options: searches with other options run beside it, in
    their own threads, as they did unbatched."""

    def __init__(self, run_group: Callable[[list], list], observe_batch: Callable[[int], None] = lambda n: None):
        """run_group(searches sharing their options) -> one hit list per search."""
        self._run_group, self._observe_batch = run_group, observe_batch
        self._cond = threading.Condition()
        self._queues: dict[str, list[Job]] = {}  # options -> searches waiting (no key without one)
        self._running: set[str] = set()

    def search(self, search, key: str) -> list:
        job = Job(search, key)
        with self._cond:
            self._queues.setdefault(key, []).append(job)
            while not job.done:
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
        if job.error is not None:
            raise job.error
        return job.hits

    def _run(self, jobs: list[Job]):
        try:
            self._observe_batch(len(jobs))
            try:
                for job, hits in zip(jobs, self._run_group([j.search for j in jobs]), strict=True):
                    job.hits = hits
            except Exception as e:
                if len(jobs) == 1:
                    jobs[0].error = e
                else:
                    for job in jobs:  # one bad search must not fail the others: each alone, its own answer
                        try:
                            job.hits = self._run_group([job.search])[0]
                        except Exception as e1:
                            job.error = e1
        finally:
            for job in jobs:
                if job.hits is None and job.error is None:
                    job.error = RuntimeError("the batch this search was part of did not finish")
                job.done = True
