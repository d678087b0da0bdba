"""Exact search while collecting (issue #26): a lone query over N originals in the memory-mapped
file, as `ExactSpaceIndex` runs it before a collection's first model.

Rows in append order are read as views of the map; shuffled rows (what removals leave) are
copied row by row.  unit_norm: a cosine space's vectors have norm 1, so a search reads only
their dot products.  The vectors: the real 1M MiniLM set's base (bench/corpus.py), normalised.

    python bench/exact.py --n 969003
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.corpus import load  # noqa: E402
from model.index import ExactIndex  # noqa: E402
from service.engine.originals import OriginalsFile  # noqa: E402


def timed(index: ExactIndex, queries: np.ndarray, repeats: int = 5) -> float:
    """Median seconds of a search of `queries` (one warm-up first)."""
    index.search(queries, 10)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(queries, 10)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=969_003)
    args = p.parse_args()
    corpus = load()
    x, queries = corpus["base"][:args.n], corpus["queries"][:16]
    with tempfile.TemporaryDirectory() as folder:
        f = OriginalsFile(Path(folder), "originals", x.shape[1], "float32", 0, 0)
        for r0 in range(0, len(x), 100_000):
            f.append(x[r0:r0 + 100_000])
        f.sync()
        f.committed()
        del x, corpus
        rows = {"append order": np.arange(args.n), "shuffled": np.random.default_rng(0).permutation(args.n)}
        print(f"{args.n:,} x {f.d} float32 originals, page cache warm; seconds per search")
        print("| rows | norms | 1 query | 16 queries |\n|---|---|---|---|")
        for label, r in rows.items():
            for unit in (False, True):
                index = ExactIndex(f.d, f, unit_norm=unit)
                index.add_rows(r, np.arange(args.n), np.zeros(args.n, bool))
                print(f"| {label} | {'skipped (unit vectors)' if unit else 'computed'} | "
                      f"{timed(index, queries[:1]):.3f} | {timed(index, queries):.3f} |", flush=True)


if __name__ == "__main__":
    main()
