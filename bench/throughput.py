"""Network throughput: encoding (the add path) and small-batch decoding (re-ranking).

Compares, in one run and on the same model:
  encode     the reference beam search (`Qinco.encode_normalized_reference`, the
             module-by-module implementation the fast path replaced) against `encode`
             (the fast path): vectors/s, MSE, share of identical codes, and a profile
             per part (pre-selection / network / beam bookkeeping) of each.
  decode     a 20-row shortlist: the reference decoder (`decode_reference` below, a copy
             of the previous `model.network.decode`, torch modules step by step) against
             `decode` (extracted weights, numpy below SMALL_DECODE rows): µs, max difference.
  query      an in-process lone query on the demo collection (QincoIndex over the demo
             model, the most frequent GloVe words added with the default encoder), nprobe 16,
             nshort 20, k 10: p50/p99 with the new decoder and with the reference one,
             and whether both return the same ids and distances.

Timings are best-of / medians of interleaved repetitions (the machine may be shared).

    python bench/throughput.py                                   # glove-50, demo model
    python bench/throughput.py --dataset wordnet-minilm-384 --model runs/wordnet-ivf-8B.safetensors \\
        --skip-query
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import datasets  # noqa: E402
from model.io import load_model  # noqa: E402
from model.network import Encoder, Qinco, check_vectors, decode, encode, fast_steps, parse_encoder  # noqa: E402

DEMO_MODEL = Path(__file__).resolve().parents[1] / "service" / "demo" / "glove-50-ivf-8B.safetensors"


# ---- the reference paths (what model/network.py did before the fast path) ---------------

def split_codes_reference(model: Qinco, codes):
    """The previous split_codes (torch checks), so that the reference decode pays what it paid."""
    cfg = model.cfg
    codes = np.asarray(codes)
    lead = 1 if cfg.nlist else 0
    codes = torch.from_numpy(codes.astype(np.int64))
    if codes[:, lead:].numel() and (codes[:, lead:].min() < 0 or codes[:, lead:].max() >= cfg.K):
        raise ValueError(f"codes must lie in [0, {cfg.K})")
    lists = None
    if lead:
        lists = codes[:, 0]
        if codes.numel() and (lists.min() < 0 or lists.max() >= cfg.nlist):
            raise ValueError(f"IVF list numbers must lie in [0, {cfg.nlist})")
    return codes[:, lead:], lists


@torch.inference_mode()
def decode_reference(model: Qinco, codes, batch_size: int = 1024) -> np.ndarray:
    """The previous `decode`: the torch modules step by step (Qinco.decode_normalized)."""
    codes, lists = split_codes_reference(model, codes)
    out = np.empty((len(codes), model.cfg.d), dtype=np.float32)
    for i0 in range(0, len(codes), batch_size):
        sl = slice(i0, i0 + batch_size)
        xn = model.decode_normalized(codes[sl], None if lists is None else lists[sl])
        out[sl] = model.denormalize(xn).numpy()
    return out


@torch.inference_mode()
def encode_reference(model: Qinco, x, encoder: Encoder, batch_size: int = 1024) -> np.ndarray:
    """`encode` through the reference beam search (same batching, same code layout)."""
    cfg = model.cfg
    x = check_vectors(x, cfg.d)
    out = []
    for i0 in range(0, len(x), batch_size):
        xn = model.normalize(torch.from_numpy(x[i0:i0 + batch_size]))
        lists = model.assign(xn) if cfg.nlist else None
        codes, _ = model.encode_normalized_reference(xn, encoder, lists)
        out.append(torch.cat([lists[:, None], codes], 1) if cfg.nlist else codes)
    return torch.cat(out).numpy()


@torch.inference_mode()
def profile_reference(model: Qinco, xn: torch.Tensor, encoder: Encoder, lists) -> dict:
    """Seconds per part of the reference beam search."""
    prof = {"pre-selection": 0.0, "network": 0.0, "beam bookkeeping": 0.0}
    model.encode_normalized_reference(xn, encoder, lists, profile=prof)
    return prof


@torch.inference_mode()
def profile_fast(model: Qinco, xn: torch.Tensor, encoder: Encoder, lists) -> dict:
    prof = {"pre-selection": 0.0, "network": 0.0, "beam bookkeeping": 0.0}
    fast_steps(model).encode(xn, encoder, model.start(lists, len(xn)), profile=prof)
    return prof


# ---- measurements -------------------------------------------------------------------------

def mse(x, y) -> float:
    return float(((x - y) ** 2).sum(1).mean())


def bench_encode(model: Qinco, xb: np.ndarray, encoder: Encoder, repeat: int):
    print(f"\n## Encode: {len(xb):,} vectors, d={model.cfg.d}, A={encoder.A} B={encoder.B}, "
          f"{torch.get_num_threads()} torch threads (best of {repeat}, interleaved)\n")
    times = {"reference": [], "fast": []}
    codes = {}
    for _ in range(repeat):
        for name, fn in (("reference", encode_reference), ("fast", encode)):
            t0 = time.perf_counter()
            codes[name] = fn(model, xb, encoder)
            times[name].append(time.perf_counter() - t0)
    rows = {}
    print("| encoder path | vec/s (best) | vec/s (median) | MSE | identical codes |")
    print("|---|---|---|---|---|")
    for name in times:
        err = mse(xb, decode(model, codes[name]))
        same = float((codes[name] == codes["reference"]).all(1).mean())
        best, med = len(xb) / min(times[name]), len(xb) / float(np.median(times[name]))
        rows[name] = (best, err)
        print(f"| {name} | {best:,.0f} | {med:,.0f} | {err:.5f} | {same:.4f} |")
    print(f"\nspeed-up (best): {rows['fast'][0] / rows['reference'][0]:.2f}x; "
          f"MSE fast / reference: {rows['fast'][1] / rows['reference'][1]:.6f}")

    xs = xb[:min(len(xb), 1024)]
    with torch.inference_mode():
        xn = model.normalize(torch.from_numpy(xs))
        lists = model.assign(xn) if model.cfg.nlist else None
    profile_fast(model, xn[:64], encoder, lists if lists is None else lists[:64])  # warm
    print(f"\nProfile per part, {len(xs):,} vectors (seconds; best of {repeat}):\n")
    print("| path | pre-selection | network | beam bookkeeping | total |")
    print("|---|---|---|---|---|")
    for name, fn in (("reference", profile_reference), ("fast", profile_fast)):
        runs = [fn(model, xn, encoder, lists) for _ in range(repeat)]
        best = min(runs, key=lambda p: sum(p.values()))
        print(f"| {name} | " + " | ".join(f"{best[k]:.3f}" for k in best) + f" | {sum(best.values()):.3f} |")


def bench_decode(model: Qinco, codes: np.ndarray, rows: int, reps: int):
    part = codes[:rows]
    ref, new = decode_reference(model, part), decode(model, part)
    times = {"reference": [], "fast": []}
    for _ in range(reps):
        for name, fn in (("reference", decode_reference), ("fast", decode)):
            t0 = time.perf_counter()
            fn(model, part)
            times[name].append(time.perf_counter() - t0)
    print(f"\n## Decode: {rows}-row shortlist, {reps} interleaved repetitions\n")
    print("| decoder | min µs | p50 µs | p99 µs |")
    print("|---|---|---|---|")
    for name, t in times.items():
        t = np.array(t) * 1e6
        print(f"| {name} | {t.min():.0f} | {np.median(t):.0f} | {np.percentile(t, 99):.0f} |")
    print(f"\nmax |fast - reference| = {np.abs(new - ref).max():.2e}; "
          f"p50 speed-up {np.median(times['reference']) / np.median(times['fast']):.2f}x")


def bench_query(model_path: Path, n: int, nq: int, encoder: Encoder, reps: int):
    import model.index as index_module
    from model.index import QincoIndex, SearchParams
    from service.demo import glove_words

    _, x = glove_words(n + nq)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)  # the demo collection is cosine
    base, queries = np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[n:])
    index = QincoIndex(load_model(model_path))
    t0 = time.perf_counter()
    index.add(base, encoder=encoder)
    t_add = time.perf_counter() - t0
    params = SearchParams(nprobe=16, ef_search=64, nshort=20)
    print(f"\n## Lone query: {n:,} GloVe words added with A={encoder.A} B={encoder.B} "
          f"({n / t_add:,.0f} vec/s through QincoIndex.add), {nq} queries one at a time, "
          f"nprobe 16, nshort 20, k 10, best p50 of {reps} interleaved rounds\n")
    results, times = {}, {}
    for name, dec in (("fast", decode), ("reference", decode_reference)):
        index_module.decode = dec
        results[name] = [index.search(q[None], 10, params) for q in queries[:20]]  # warm
        times[name] = []
    for _ in range(reps):
        for name, dec in (("fast", decode), ("reference", decode_reference)):
            index_module.decode = dec
            t = []
            for q in queries:
                t0 = time.perf_counter()
                index.search(q[None], 10, params)
                t.append(time.perf_counter() - t0)
            times[name].append(np.array(t) * 1e3)
    index_module.decode = decode
    same_ids = all((a[1] == b[1]).all() for a, b in zip(results["fast"], results["reference"]))
    max_dd = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(results["fast"], results["reference"]))
    print("| decoder | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, runs in times.items():
        best = min(runs, key=np.median)
        print(f"| {name} | {np.median(best):.3f} | {np.percentile(best, 99):.3f} |")
    print(f"\nsame ids: {same_ids}; max distance difference {max_dd:.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["glove-50", "wordnet-minilm-384"], default="glove-50")
    p.add_argument("--model", default=str(DEMO_MODEL), help="QINCo model (default: the demo model, glove-50)")
    p.add_argument("--encoder", default="balanced", help="a name from ENCODERS, AxB or AxBxR (default balanced)")
    p.add_argument("--nb", type=int, default=2048, help="base vectors to encode (default 2048)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved encode repetitions (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--decode-rows", type=int, default=20)
    p.add_argument("--decode-reps", type=int, default=1000)
    p.add_argument("--query-points", type=int, default=100_000, help="demo collection size (default 100,000)")
    p.add_argument("--queries", type=int, default=500, help="lone queries per round (default 500)")
    p.add_argument("--query-rounds", type=int, default=3)
    p.add_argument("--build-encoder", default="balanced", help="encoder that fills the demo index")
    p.add_argument("--skip-encode", action="store_true")
    p.add_argument("--skip-query", action="store_true")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    enc, build = parse_encoder(args.encoder), parse_encoder(args.build_encoder)
    model = load_model(args.model)
    ds = datasets.load(args.dataset)
    xb = np.ascontiguousarray(ds.base[:args.nb], dtype=np.float32)
    print(f"{args.dataset}: model {args.model} {model.cfg}, {torch.get_num_threads()} torch threads")
    if not args.skip_encode:
        bench_encode(model, xb, enc, args.repeat)
    bench_decode(model, encode(model, xb[:max(args.decode_rows, 64)], enc), args.decode_rows, args.decode_reps)
    if not args.skip_query:
        bench_query(Path(args.model) if args.dataset == "glove-50" else DEMO_MODEL,
                    args.query_points, args.queries, build, args.query_rounds)


if __name__ == "__main__":
    main()
