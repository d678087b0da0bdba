"""Codec benchmark: QINCo against faiss PQ, OPQ, RQ, LSQ++ and their product variants at the same code size.

For each data set and code size, every codec is trained on the same learn set,
encodes the same base, and is judged in the same run:
  MSE          mean squared reconstruction error over the base
  R@1, R@10    exhaustive search of the queries over the decoded base
  encode/s     base vectors encoded per second
  decode/s     codes decoded per second
QINCo rows come from models trained by `qinco train` (one row per encoder
setting).  The decode speed of a faiss IndexQINCo of the same architecture is
printed next to ours.

    python bench/codec.py --dataset glove-50 --bytes 8 --model runs/glove-50-8B.safetensors

`--dataset minilm-1m` is the real 1M MiniLM set of bench/corpus.py (100,000 learn vectors,
969,003 base); `--nb` takes the first base vectors, with exact ground truth over them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

from model import datasets
from model.io import load_model, to_faiss_qinco
from model.network import Encoder, decode, encode, parse_encoder


MINILM_1M = "minilm-1m"


def load_dataset(name: str) -> tuple[datasets.Dataset, np.ndarray]:
    """The set and its exact top-100 ground truth over the whole base."""
    if name != MINILM_1M:
        ds = datasets.load(name)
        return ds, datasets.ground_truth(ds)
    from bench.corpus import load
    part = load()
    return datasets.Dataset(name, part["learn"], part["base"], part["queries"], "angular"), part["gt"]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def evaluate(name: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, recon: np.ndarray,
             t_encode: float, t_decode: float) -> dict:
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(recon)
    _, ids = index.search(xq, 10)
    return {"codec": name, "mse": float(((xb - recon) ** 2).sum(1).mean()),
            "R@1": datasets.recall_at(ids, gt, 1), "R@10": datasets.recall_at(ids, gt, 10),
            "encode_per_s": len(xb) / t_encode, "decode_per_s": len(xb) / t_decode}


def faiss_codecs(d: int, nbytes: int) -> dict[str, str]:
    """Row name -> faiss factory key (with options after '|'): every faiss codec at these bytes,
    each trained on the whole learn split with its authors' defaults, and stronger settings."""
    M = nbytes
    opq_d = d if d % M == 0 else (d // M + 1) * M
    codecs = {f"PQ{M}x8": f"PQ{M}", f"OPQ{M}_{opq_d},PQ{M}x8": f"OPQ{M}_{opq_d},PQ{M}",
              f"RQ{M}x8 (beam 5)": f"RQ{M}x8|beam=5",
              f"RQ{M}x8 (beam 32, codebook refinement)": f"RQ{M}x8|beam=32,refine=1",
              f"LSQ{M}x8 (LSQ++, defaults)": f"LSQ{M}x8",
              f"LSQ{M}x8 (LSQ++, train_iters 50, encode_ils_iters 32)": f"LSQ{M}x8|train_iters=50,encode_ils_iters=32",
              f"LSQ{M}x8 (LSQ++, train_iters 100, encode_ils_iters 32)": f"LSQ{M}x8|train_iters=100,encode_ils_iters=32"}
    if M % 2 == 0:  # product variants: 2 halves of the vector, M/2 bytes each
        codecs[f"PRQ2x{M // 2}x8"] = f"PRQ2x{M // 2}x8|beam=5"
        codecs[f"PLSQ2x{M // 2}x8"] = f"PLSQ2x{M // 2}x8"
    return codecs


def quantizers(index) -> list:
    """The additive quantizer(s) inside a faiss codec index: one, one per product part, or none (PQ)."""
    if not hasattr(index, "aq"):
        return []
    q = faiss.downcast_AdditiveQuantizer(index.aq)
    if isinstance(q, (faiss.ProductResidualQuantizer, faiss.ProductLocalSearchQuantizer)):
        return [faiss.downcast_AdditiveQuantizer(q.subquantizer(i)) for i in range(q.nsplits)]
    return [q]


def bench_faiss(key: str, xt, xb, xq, gt, lsq_train: int) -> dict:
    d = xt.shape[1]
    key, _, options = key.partition("|")
    options = dict(kv.split("=") for kv in options.split(",") if kv)
    if key.startswith("PQ") and d % int(key[2:]):  # PQ needs d divisible by M: zero-pad (changes no distance)
        M = int(key[2:])
        padded = d + (-d) % M
        index = faiss.IndexPreTransform(faiss.RemapDimensionsTransform(d, padded, True),
                                        faiss.IndexPQ(padded, M, 8))
    else:
        index = faiss.index_factory(d, key)
    for q in quantizers(index):
        if "beam" in options:
            q.max_beam_size = int(options["beam"])
        if options.get("refine") == "1":
            if len(xt) < q.total_codebook_size:
                return {"skipped": f"codebook refinement needs at least M x K = {q.total_codebook_size} training vectors"}
            q.train_type = faiss.ResidualQuantizer.Train_progressive_dim | faiss.ResidualQuantizer.Train_refine_codebook
        for name in ("train_iters", "encode_ils_iters"):
            if name in options:
                setattr(q, name, int(options[name]))
    if "LSQ" in key and lsq_train:  # LSQ training encodes its set many times over
        xt = xt[:lsq_train]
    _, t_train = timed(index.train, xt)
    codes, t_enc = timed(index.sa_encode, xb)
    recon, t_dec = timed(index.sa_decode, codes)
    return {**evaluate("", xb, xq, gt, recon, t_enc, t_dec), "train_s": t_train, "trained_on": len(xt)}


def bench_qinco(path: Path, xb, xq, gt, encoders: dict[str, Encoder]) -> list[dict]:
    model = load_model(path)
    rows = []
    codes, searched = None, set()
    for name, enc in encoders.items():
        # A model with seed codes (an LSQ++ start) also gets the row without them: what they add
        # (once per search: the seeds' rounds do not change it).
        for seeded in [True, False] if enc.seeded and len(model.seed_codebooks) else [enc.seeded]:
            if not seeded:
                if (enc.A, enc.B) in searched:
                    continue
                searched.add((enc.A, enc.B))
            codes, t_enc = timed(encode, model, xb, dataclasses.replace(enc, seeded=seeded))
            recon, t_dec = timed(decode, model, codes)
            row = evaluate("", xb, xq, gt, recon, t_enc, t_dec)
            seeds = f", LSQ++ seeds {enc.seed_rounds} rounds" if seeded and len(model.seed_codebooks) else ""
            row["codec"] = f"QINCo {name} (A={min(enc.A, model.cfg.K)}, B={enc.B}{seeds}), {path.stem}"
            rows.append(row)
    if model.cfg.nlist == 0 and model.cfg.de == 0 and model.cfg.rank == 0 and codes is not None:
        index = to_faiss_qinco(model)
        n = min(len(codes), 20_000)
        (recon, t_dec) = timed(index.sa_decode, np.ascontiguousarray(codes[:n]))
        ours = model.denormalize(torch.from_numpy(recon)).numpy()
        agree = float(np.abs(ours - decode(model, codes[:n])).max())
        rows.append({"codec": f"faiss IndexQINCo decode (same network), {path.stem}", "decode_per_s": n / t_dec,
                     "max_abs_diff_vs_ours": agree})
    return rows


def print_table(title: str, rows: list[dict]):
    print(f"\n## {title}\n")
    print("| codec | MSE | R@1 | R@10 | training s | encode vec/s | decode vec/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["codec"]] + [f"{r[k]:.4f}" if k in r else "" for k in ("mse", "R@1", "R@10")]
        cells += [f"{r[k]:,.0f}" if k in r else "" for k in ("train_s", "encode_per_s", "decode_per_s")]
        print("| " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=datasets.NAMES + (MINILM_1M,), required=True)
    p.add_argument("--bytes", type=int, default=8)
    p.add_argument("--model", action="append", default=[], help="QINCo model(s) trained on this set's learn split")
    p.add_argument("--encoders", default="greedy,fast,quality",
                   help="QINCo encoder settings: names (greedy,fast,balanced,quality), AxB such as 64x16, "
                        "or AxBxR (R seed rounds)")
    p.add_argument("--nb", type=int, default=0, help="use the first NB base vectors (default: all)")
    p.add_argument("--nt", type=int, default=0, help="train faiss codecs on the first NT learn vectors (default: all)")
    p.add_argument("--nq", type=int, default=2000, help="queries (default 2000)")
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--faiss", default="", help="only the faiss rows whose name contains one of these (comma-separated)")
    p.add_argument("--lsq-train", type=int, default=0, help="train LSQ on the first N learn vectors (default: all)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    try:  # a typo fails now, not after the faiss rows' training
        encoders = {name: parse_encoder(name) for name in args.encoders.split(",")}
    except ValueError as e:
        p.error(str(e))

    ds, gt = load_dataset(args.dataset)
    if args.nt:
        ds.learn = ds.learn[:args.nt]
    xb = ds.base[:args.nb] if args.nb else ds.base
    xq = ds.queries[:args.nq]
    if args.nb:
        index = faiss.IndexFlatL2(ds.d)
        index.add(xb)
        gt = index.search(xq, 10)[1]
    else:
        gt = gt[:args.nq]
    print(f"{args.dataset}: learn {ds.learn.shape}, base {xb.shape}, queries {xq.shape}, "
          f"{args.bytes} bytes per vector, {torch.get_num_threads()} threads")
    rows = []
    if not args.skip_faiss:
        for name, key in faiss_codecs(ds.d, args.bytes).items():
            if args.faiss and not any(part in name for part in args.faiss.split(",")):
                continue
            row = bench_faiss(key, ds.learn, xb, xq, gt, args.lsq_train)
            row["codec"] = f"faiss {name}"
            if "skipped" in row:
                print(f"{row['codec']}: skipped, {row['skipped']}")
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
    for path in args.model:
        for row in bench_qinco(Path(path), xb, xq, gt, encoders):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(f"{args.dataset}, {args.bytes} bytes per vector, base {len(xb):,}, {len(xq):,} queries", rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
