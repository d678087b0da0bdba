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
    def __init__(self, run_group: Callable[[list], list], observe_batch: Callable[[int], None] = lambda n: None):
        """run_group(searches sharing their options) -> one hit list per search."""
        self._run_group, self._observe_batch = run_group, observe_batch
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._busy = False

    def search(self, search, key: str) -> list:
        job = Job(search, key)
        with self._cond:
            self._queue.append(job)
            while not job.done:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy, batch, self._queue = True, self._queue, []
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.hits

    def _run(self, batch: list[Job]):
        self._observe_batch(len(batch))
        groups: dict[str, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.key, []).append(job)
        try:
            for jobs in groups.values():
                try:
                    for job, hits in zip(jobs, self._run_group([j.search for j in jobs]), strict=True):
                        job.hits = hits
                except Exception as e:
                    if len(jobs) == 1:
                        jobs[0].error = e
                        continue
                    for job in jobs:  # one bad search must not fail the others: each alone, its own answer
                        try:
                            job.hits = self._run_group([job.search])[0]
                        except Exception as e1:
                            job.error = e1
        finally:
            for job in batch:
                if job.hits is None and job.error is None:
                    job.error = RuntimeError("the batch this search was part of did not finish")
                job.done = True
