"""A space's id -> originals-row map held in memory as runs: ids start .. start + n - 1 are rows
row .. row + n - 1.  Points loaded in batches of ascending ids (and every compacted file, whose
row is the id's rank) make a few runs for millions of points: a rescore then finds its
candidates' rows without SQLite's B-tree walks, one uncached page read each (~9 of a cold
rescore's ~12 ms at 1M points).  Scattered ids make a run each: past MAX_RUNS the map is not
kept, and SQLite's `original_rows` answers as before.  Immutable: a change makes a new map, so
readers need no lock.  A space whose map passed MAX_RUNS reads SQLite until a compaction or a
restart builds the map again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_RUNS = 1 << 14  # 384 KiB of arrays, sorted again by each write that changes them (~1.5 ms)
TOP_ID = np.iinfo(np.int64).max  # a run through it would end past int64: such ids get no map


@dataclass(frozen=True, eq=False)
class RowRuns:
    starts: np.ndarray  # (runs,) int64, ascending: each run's first id
    rows: np.ndarray  # (runs,) int64: the row of that id
    lengths: np.ndarray  # (runs,) int64, > 0; runs never overlap

    @staticmethod
    def empty() -> RowRuns:
        return RowRuns(*(np.zeros(0, np.int64) for _ in range(3)))

    def __len__(self) -> int:
        return len(self.starts)

    def _run_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the run that could hold each id, whether it does)."""
        r = np.searchsorted(self.starts, ids, side="right") - 1
        safe = np.maximum(r, 0)
        inside = (r >= 0) & (ids - self.starts[safe] < self.lengths[safe]) if len(self) else np.zeros(len(ids), bool)
        return safe, inside

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the mapped ids among `ids`, their rows), absent ones skipped."""
        ids = np.asarray(ids, dtype=np.int64)
        r, inside = self._run_of(ids)
        ids, r = ids[inside], r[inside]
        return ids, self.rows[r] + (ids - self.starts[r])

    def with_changes(self, ids: np.ndarray, rows: np.ndarray | None) -> RowRuns | None:
        """The map once `ids` map to `rows` (None: once they are removed); a later duplicate id
        wins, as in SQLite's INSERT OR REPLACE.  None where it would exceed MAX_RUNS."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and ids.max() == TOP_ID:
            return None
        # cut the changed ids out of their runs: each cut ends a segment and starts the next
        cuts = np.unique(ids)
        r, inside = self._run_of(cuts)
        cuts, r = cuts[inside], r[inside]
        ends = self.starts + self.lengths
        seg_starts = np.sort(np.concatenate([self.starts, cuts + 1]))
        seg_ends = np.sort(np.concatenate([ends, cuts]))
        keep = seg_ends > seg_starts
        seg_starts, seg_ends = seg_starts[keep], seg_ends[keep]
        run = np.searchsorted(self.starts, seg_starts, side="right") - 1
        seg_rows = self.rows[run] + (seg_starts - self.starts[run])
        starts, lengths, run_rows = seg_starts, seg_ends - seg_starts, seg_rows
        if rows is not None:
            last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]  # each id's last place
            new_ids, new_rows = ids[last], np.asarray(rows, dtype=np.int64)[last]
            starts = np.concatenate([starts, new_ids])
            lengths = np.concatenate([lengths, np.ones(len(new_ids), np.int64)])
            run_rows = np.concatenate([run_rows, new_rows])
            order = np.argsort(starts, kind="stable")
            starts, lengths, run_rows = starts[order], lengths[order], run_rows[order]
        return _joined(starts, run_rows, lengths)


def _joined(starts: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> RowRuns | None:
    """Sorted, disjoint runs with each one that continues the one before (in ids and in rows)
    joined to it; None past MAX_RUNS."""
    if len(starts) == 0:
        return RowRuns.empty()
    continues = (starts[1:] == starts[:-1] + lengths[:-1]) & (rows[1:] == rows[:-1] + lengths[:-1])
    first = np.flatnonzero(np.concatenate([[True], ~continues]))
    if len(first) > MAX_RUNS:
        return None
    return RowRuns(starts[first].copy(), rows[first].copy(), np.add.reduceat(lengths, first))


@dataclass(frozen=True, eq=False)
class RowRunsAsOf:
    """A space's `original_rows` as runs, as of its originals file `generation` and the record's
    `original_rows_version` (which each transaction that changes the table bumps): a reader whose
    own transaction sees both reads the runs, and SQLite otherwise."""
    generation: int
    version: int
    runs: RowRuns
