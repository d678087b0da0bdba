"""Recall and lone latency of a kept collection over a grid of search params (issue #26).

    python bench/scale.py --data minilm --n 969003 --keep --work W      # leaves W/n969003
    python bench/sweep.py W/n969003 '[{}, {"nprobe": 32, "quantization": {"rescore": true, "oversampling": 8}}]'

Starts `qinco serve` on the data directory (collection "c", the real 1M MiniLM set of
bench/corpus.py), then for each params: 10-R@10 and 1-R@10 over 1,000 queries against the exact
top 10, and the warm p50/p99 of 200 lone searches (`--cold`: also with the collection's files
dropped from the page cache before each one).  One JSON line each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.corpus import load  # noqa: E402
from bench.scale import drop_page_cache, latency, recall, wait_searchable  # noqa: E402
from bench.soak import free_port, start_server, stop_server  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a data directory kept by bench/scale.py --keep")
    p.add_argument("grid", help="a JSON list of search params")
    p.add_argument("--cold", action="store_true", help="also time each params with a cold page cache")
    args = p.parse_args()
    corpus = load()
    queries, gt = corpus["queries"][:1000], corpus["gt"][:1000]
    del corpus
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.data, port, {}, args.data.parent / "sweep-server.log")
    try:
        wait_searchable(url, queries[0])
        info = httpx.get(f"{url}/collections/c").json()["result"]
        print(json.dumps({"nlist": info.get("nlist"), "model": info["qinco"].get("model")}), flush=True)
        folder = args.data / "collections" / "c"
        for params in json.loads(args.grid):
            row = {"params": params, **recall(url, queries, gt, params), **latency(url, queries[:200], params=params)}
            if args.cold:
                cold = latency(url, queries[:200], params=params, before=lambda: drop_page_cache(folder))
                row.update(cold_p50_ms=cold["p50_ms"], cold_p99_ms=cold["p99_ms"])
            print(json.dumps(row), flush=True)
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
