"""RSS per point of the in-memory structures, each in a fresh process (issue #26 goal 1).

    python -m bench.memory                       # 1M points each
    python -m bench.memory --n 10000000 --huge-pages

  lists      model/lists.py's ListStore: N random 9-byte codes and their ids added in batches of
             1,000 over 1,024 lists of uneven sizes (Dirichlet), compacted as the service does.
  keyword    a payload field index (service/engine/filters.py) over N points, each with one of
             10 words, indexed in batches of 1,000.
  integer    the same with a random integer below 10^9 per point.
  ids        the point set (service/engine/ids.py's PointSet) of N sequential ids, added in
             batches of 1,000; `ids_1e9` N distinct random ids below 10^9; `ids_2e62` below 2^62.

Each reports the growth of VmRSS over the build divided by N, after the allocator settings of
`qinco serve` (service/memory.py), with the heap's free blocks given back (malloc_trim) before
and after; `--huge-pages` leaves numpy's transparent huge pages on, as they were before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import gc, json, sys, time
import numpy as np
from service.memory import fix_malloc_thresholds, no_huge_pages_for_arrays, release_free_memory
kind, n, huge = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
fix_malloc_thresholds()
if not huge:
    no_huge_pages_for_arrays()
from model.lists import ListStore
from service.engine.filters import FieldIndex
from service.engine.ids import PointSet

def rss():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS"))) * 1024

rng = np.random.default_rng(0)
words = ["news", "blog", "paper", "forum", "wiki", "code", "mail", "chat", "book", "misc"]
def batch():
    if kind == "keyword":
        return [{"k": words[t]} for t in rng.integers(0, 10, 1000).tolist()]
    return [{"k": v} for v in rng.integers(0, 10**9, 1000).tolist()]

if kind == "lists":
    p = rng.dirichlet(np.ones(1024) * 2)
    build = ListStore(1024, 9)
    def add(i0):
        build.add(rng.choice(1024, 1000, p=p), rng.integers(0, 256, (1000, 9), dtype=np.uint8),
                  np.arange(i0, i0 + 1000))
        build.compact()
elif kind.startswith("ids"):
    high = {"ids": None, "ids_1e9": 10**9, "ids_2e62": 1 << 62}[kind]
    order = np.arange(n) if high is None else rng.permutation(np.unique(rng.integers(0, high, 2 * n))[:n])
    build = PointSet(np.zeros(0, np.int64))
    def add(i0):
        build.add(order[i0:i0 + 1000])
else:
    build = FieldIndex("k")
    def add(i0):
        build.add_many(range(i0, i0 + 1000), batch())
    warm = FieldIndex("k")  # first-use costs (imports, the allocator's first arenas) out of the figure
    for i0 in range(0, 10_000, 1000):
        warm.add_many(range(i0, i0 + 1000), batch())
    del warm
gc.collect()
release_free_memory()  # the set-up's temporaries out of the baseline
before, t0 = rss(), time.time()
for i0 in range(0, n, 1000):
    add(i0)
if kind == "integer":
    build.ints.sorted()  # what the first range filter does
gc.collect()
release_free_memory()  # what the structure holds, not the allocator's free blocks
print(json.dumps({"kind": kind, "n": n, "huge_pages": huge, "rss_per_point": round((rss() - before) / n, 1),
                  "seconds": round(time.time() - t0, 1)}))
"""


def measure(kind: str, n: int, huge: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, kind, str(n), "1" if huge else "0"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--kinds", default="lists,keyword,integer,ids,ids_1e9,ids_2e62")
    p.add_argument("--huge-pages", action="store_true", help="also measure with numpy's huge pages on")
    args = p.parse_args(argv)
    for kind in args.kinds.split(","):
        for huge in ((False, True) if args.huge_pages else (False,)):
            t0 = time.time()
            row = measure(kind, args.n, huge)
            print(json.dumps(row), f"({time.time() - t0:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
