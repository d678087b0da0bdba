"""Filtered search: recall@1/10 against exact filtered ground truth, and QPS, next to unfiltered search.

Each base vector gets a synthetic payload {"bucket": b}, b uniform in [0, 1000); a filter
{"key": "bucket", "range": {"lt": 1000 s}} lets a fraction s through.  For every
selectivity and nprobe: the ids the filter allows (service.engine.filters over a field index,
timed apart), the filtered search, and recall against the exact nearest allowed neighbours
of the original vectors (faiss IndexFlatL2 over the allowed base rows).  One thread.

    python bench/filters.py --dataset wordnet-minilm-384 --model runs/wordnet-ivf-8B.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from model import datasets
from model.index import QincoIndex, SearchParams
from model.io import load_model
from model.network import ENCODERS
from model.threads import set_threads
from service.http import schemas
from service.engine.filters import Evaluator, FieldIndex


def timed_search(index, queries, k, params, allowed, repeats=3):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = index.search(queries, k, params, allowed_ids=allowed)
        best = min(best, time.perf_counter() - t0)
    return result, len(queries) / best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="wordnet-minilm-384", choices=datasets.NAMES)
    p.add_argument("--model", required=True, help="an IVF model trained on this set")
    p.add_argument("--nb", type=int, help="base vectors (default: all)")
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--encoder", default="balanced", choices=sorted(ENCODERS))
    p.add_argument("--selectivity", default="1,0.5,0.05,0.001", help="fractions let through (1: no filter)")
    p.add_argument("--nprobe", default="1,4,16")
    p.add_argument("--nshort", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    set_threads(args.threads)

    ds = datasets.load(args.dataset)
    base = ds.base[:args.nb] if args.nb else ds.base
    queries = ds.queries[:args.nq]
    index = QincoIndex(load_model(args.model))
    t0 = time.time()
    for i0 in range(0, len(base), 4096):
        index.add(base[i0:i0 + 4096], np.arange(i0, min(i0 + 4096, len(base))), ENCODERS[args.encoder])
    print(f"{args.dataset}: {len(base):,} base vectors encoded ({args.encoder}) in {time.time() - t0:.0f}s, "
          f"{len(queries)} queries, nshort {args.nshort}, {args.threads} thread(s)")

    buckets = np.random.default_rng(0).integers(0, 1000, len(base))
    field = FieldIndex("bucket")
    for i, b in enumerate(buckets):
        field.add(i, {"bucket": int(b)})
    evaluator = Evaluator(np.arange(len(base)), lambda key: field)

    rows = []
    print(f"{'selectivity':>11} {'allowed':>8} {'filter ms':>9} {'nprobe':>6} {'R@1':>6} {'R@10':>6} {'QPS':>8}")
    for s in [float(x) for x in args.selectivity.split(",")]:
        if s >= 1:
            allowed, filter_ms = None, 0.0
            members = np.arange(len(base))
        else:
            f = schemas.Filter.model_validate({"must": [{"key": "bucket", "range": {"lt": s * 1000}}]})
            t0 = time.perf_counter()
            allowed = evaluator.ids(f)
            filter_ms = (time.perf_counter() - t0) * 1000
            members = allowed
        flat = faiss.IndexFlatL2(base.shape[1])
        flat.add(np.ascontiguousarray(base[members]))
        truth = members[flat.search(queries, 1)[1][:, 0]]
        for nprobe in [int(x) for x in args.nprobe.split(",")]:
            params = SearchParams(nprobe, max(32, 2 * nprobe), args.nshort)
            (_, ids), qps = timed_search(index, queries, 10, params, allowed)
            r1 = float((ids[:, :1] == truth[:, None]).any(1).mean())
            r10 = float((ids[:, :10] == truth[:, None]).any(1).mean())
            rows.append({"selectivity": s, "allowed": len(members), "filter_ms": filter_ms, "nprobe": nprobe,
                         "R@1": r1, "R@10": r10, "qps": qps})
            print(f"{s:>11g} {len(members):>8} {filter_ms:>9.2f} {nprobe:>6} {r1:>6.3f} {r10:>6.3f} {qps:>8,.0f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"filters-{args.dataset}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
