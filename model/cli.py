"""`qinco` command line: train, encode, decode, build, tune, search, eval (the service adds `serve`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import datasets, distributed, io
from .index import QincoIndex, SearchParams
from .network import ENCODERS, HIGH_D, HIGH_D_WIDTH, Encoder, QincoConfig, code_dtype, code_width, decode, default_de, encode
from .ray_encode import RayRun, encode_on_ray
from .threads import set_threads
from .train import INITS, LOSSES, OPTIMIZERS, SCHEDULES, TrainConfig, train


def add_encoder_args(p: argparse.ArgumentParser, default: str):
    p.add_argument("--encoder", choices=sorted(ENCODERS), default=default,
                   help=f"named encoder setting (default: {default}); -A/-B override it")
    p.add_argument("-A", type=int, help="pre-selected candidates per beam")
    p.add_argument("-B", type=int, help="beam size")
    p.add_argument("--batch", type=int, default=1024)


def add_ray_args(p: argparse.ArgumentParser):
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="encode on a Ray cluster (pip install -e '.[ray]'): alone, a new local cluster; or the "
                        "address of a cluster this machine is a node of (HEAD:6379, auto). Same codes as without it")
    p.add_argument("--ray-actors", dest="ray_actors", type=int, default=0,
                   help="Ray actors (default 0: one per cluster GPU where it lists GPUs and --device is not cpu, "
                        "else one per cluster CPU); each uses cluster CPUs / actors threads")


def ray_codes(args, x: np.ndarray, bar, batch_size: int | None, run: RayRun):
    """(rows, codes) in row order from a Ray cluster, one --batch segment at a time; `run` gets the figures."""
    if args.ray_actors < 0:
        raise ValueError(f"--ray-actors must be >= 0, got {args.ray_actors}")
    return encode_on_ray(args.model, x, encoder_from_args(args), args.batch, batch_size, args.ray,
                         args.ray_actors, progress=bar, run=run, device=args.device)


def encoder_from_args(args) -> Encoder:
    base = ENCODERS[args.encoder]
    return dataclasses.replace(base, A=args.A or base.A, B=args.B or base.B)


def cmd_train(args):
    data = io.as_float32(io.read_vectors(args.data))
    if args.limit:
        data = data[:args.limit]
    if args.bytes * 8 % max(1, int(np.log2(args.K))) and not args.resume:
        raise SystemExit(f"--bytes {args.bytes} is not a whole number of {int(np.log2(args.K))}-bit steps")
    cfg = None
    if args.de is not None and not 0 <= args.de <= data.shape[1]:
        raise ValueError(f"--de must be between 0 (d) and d = {data.shape[1]}, got {args.de}")
    if not args.resume:
        cfg = QincoConfig(d=data.shape[1], M=args.bytes * 8 // int(np.log2(args.K)), K=args.K, L=args.L,
                          h=args.h, de=default_de(data.shape[1]) if args.de is None else args.de,
                          rank=args.rank, nlist=args.nlist)
    tc_fields = {f.name for f in fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in tc_fields and v is not None})
    distributed.init_from_env(distributed.resolve_device(tc.device))  # under torchrun: one process per device
    train(data, args.out, cfg, tc, resume=args.resume)
    if distributed.rank_world()[0] == 0:
        print(f"saved {args.out}")


def cmd_data(args):
    try:
        ds = datasets.load(args.name)
    except datasets.DatasetUnavailable as e:
        raise ValueError(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"learn": ds.learn, "base": ds.base, "queries": ds.queries, "gt100": datasets.ground_truth(ds)}
    for name, array in arrays.items():
        io.atomic_write(out / f"{name}.npy", lambda f, a=array: np.save(f, a))
        print(f"{out / name}.npy  {array.shape} {array.dtype}")


def cmd_encode(args):
    model = io.load_model(args.model)
    x = io.read_vectors(args.data, mmap=True)
    run = RayRun()
    with tqdm(total=len(x), unit="vec", desc="encoding") as bar:
        if args.ray:
            codes = np.empty((len(x), code_width(model.cfg)), dtype=code_dtype(model.cfg))
            for rows, part in ray_codes(args, x, bar, args.batch, run):
                codes[rows] = part
        else:
            codes = encode(model, x, encoder_from_args(args), args.batch, progress=bar,
                           device=distributed.resolve_device(args.device))
    if args.ray:
        print(run.report(), file=sys.stderr)  # per-actor throughput
    if args.int32:
        codes = codes.astype(np.int32)
    io.write_vectors(args.out, codes)
    print(f"wrote {codes.shape} {codes.dtype} codes to {args.out}")


def cmd_decode(args):
    model = io.load_model(args.model)
    codes = np.load(args.codes, allow_pickle=False)
    x = decode(model, codes)
    io.write_vectors(args.out, x)
    print(f"wrote {x.shape} float32 vectors to {args.out}")


def cmd_build(args):
    model = io.load_model(args.model)
    x = io.read_vectors(args.base, mmap=True)
    ids = np.load(args.ids, allow_pickle=False) if args.ids else np.arange(len(x))
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
    index = QincoIndex(model)
    encoder = encoder_from_args(args)
    device = None if args.ray else distributed.resolve_device(args.device)  # on Ray: the actors' GPUs, if any
    run = RayRun()
    with tqdm(total=len(x), unit="vec", desc="encoding + adding") as bar:
        if args.ray and len(x):  # segments of --batch rows, each encoded like index.encode(segment): the same index
            for rows, codes in ray_codes(args, x, bar, None, run):
                index.add_codes(codes, ids[rows])
        else:
            for i0 in range(0, len(x), args.batch):  # batches keep memory flat on big files
                codes = index.encode(x[i0:i0 + args.batch], encoder, device=device)
                index.add_codes(codes, ids[i0:i0 + args.batch])
                bar.update(len(codes))
    if run.vectors:
        print(run.report(), file=sys.stderr)  # per-actor throughput
    index.save(args.out)
    print(f"wrote {args.out}: {index.ntotal} vectors, {index.code_bytes} bytes each + list id")


def load_ground_truth(args, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact neighbour ids of the queries, from --gt or by exhaustive search of --base."""
    if args.gt:
        gt = np.load(args.gt, allow_pickle=False)
        if gt.ndim != 2 or len(gt) != len(queries):
            raise ValueError(f"--gt must have one row per query, got shape {gt.shape}")
        return gt
    if not args.base:
        raise ValueError("tuning and evaluation need exact ground truth: pass --gt GT.npy or --base BASE")
    base = io.as_float32(io.read_vectors(args.base))
    ids = np.load(args.ids, allow_pickle=False) if args.ids else np.arange(len(base))
    return ids[datasets.exact_knn(base, queries, k)]


def add_ground_truth_args(p: argparse.ArgumentParser):
    p.add_argument("--gt", help="exact neighbour ids (nq, k) .npy")
    p.add_argument("--base", help="or: the indexed vectors, to compute exact neighbours")
    p.add_argument("--ids", help="ids of --base rows (default: row numbers)")


def cmd_tune(args):
    index = QincoIndex.load(args.index)
    queries = io.as_float32(io.read_vectors(args.queries))
    gt = load_ground_truth(args, queries, args.k)
    front = index.tune(queries, gt, args.k)
    print(f"Pareto front, recall@{args.k} ({len(queries)} queries):")
    print(f"{'nprobe':>7} {'ef':>5} {'nshort':>7} {'recall':>7} {'ms/query':>9}")
    for p in front:
        print(f"{p.params.nprobe:>7} {p.params.ef_search:>5} {p.params.nshort:>7} {p.recall:>7.3f} {p.ms_per_query:>9.3f}")
    index.save(args.index)
    if args.target_recall:
        print(f"target recall {args.target_recall}: {index.params_for_recall(args.target_recall)}")


def search_params_from_args(args, nlist: int) -> SearchParams:
    default = SearchParams.defaults(nlist)
    return SearchParams(args.nprobe or default.nprobe, args.ef_search or default.ef_search,
                        default.nshort if args.nshort is None else args.nshort)


def cmd_search(args):
    index = QincoIndex.load(args.index)
    queries = io.as_float32(io.read_vectors(args.queries))
    if args.target_recall:
        D, I = index.search(queries, args.k, target_recall=args.target_recall)
    else:
        D, I = index.search(queries, args.k, search_params_from_args(args, index.model.cfg.nlist))
    io.write_vectors(args.out, I)
    if args.distances:
        io.write_vectors(args.distances, D)
    print(f"wrote {I.shape} int64 ids to {args.out}")


def cmd_eval(args):
    index = QincoIndex.load(args.index)
    queries = io.as_float32(io.read_vectors(args.queries))
    gt = load_ground_truth(args, queries, 1)
    rows = evaluate_grid(index, queries, gt[:, 0])
    print(f"{'nprobe':>7} {'ef':>5} {'nshort':>7} {'R@1':>6} {'R@10':>6} {'R@100':>6} {'QPS':>9}")
    for r in rows:
        p = r["params"]
        print(f"{p.nprobe:>7} {p.ef_search:>5} {p.nshort:>7} {r['R@1']:>6.3f} {r['R@10']:>6.3f} "
              f"{r['R@100']:>6.3f} {r['qps']:>9.0f}")
    if args.plot:
        plot_recall_qps({"QINCo IVF-HNSW": rows}, args.plot, f"{args.index}")
        print(f"wrote {args.plot}")


def evaluate_grid(index: QincoIndex, queries: np.ndarray, nearest: np.ndarray, nprobes=None,
                  nshorts=None) -> list[dict]:
    """R@1/10/100 and QPS (one batch of all queries) over a grid of search parameters (nshort 0: no re-ranking)."""
    nlist = index.model.cfg.nlist
    nprobes = nprobes or [p for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= nlist]
    nshorts = nshorts or (0, 100, 200, 500, 1000)
    rows = []
    for nprobe in nprobes:
        for nshort in nshorts:
            params = SearchParams(nprobe, max(32, 2 * nprobe), nshort)
            t0 = time.perf_counter()
            _, ids = index.search(queries, 100, params)
            qps = len(queries) / (time.perf_counter() - t0)
            rows.append({"params": params, "qps": qps,
                         **{f"R@{k}": datasets.recall_at(ids, nearest[:, None], k) for k in (1, 10, 100)}})
    return rows


def plot_recall_qps(curves: dict[str, list[dict]], path: str, title: str, recall_key: str = "R@10"):
    """Recall vs QPS (log scale), one line per method, Pareto points only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        pts = sorted(((r[recall_key], r["qps"]) for r in rows), key=lambda t: -t[1])
        front, best = [], -1.0
        for rec, qps in pts:
            if rec > best:
                front.append((rec, qps))
                best = rec
        part = name.startswith(" ")  # an indented name is a part of the curve above it
        ax.plot([p[0] for p in front], [p[1] for p in front], marker="." if part else "o",
                linestyle="--" if part else "-", label=name.strip())
    ax.set_xlabel(recall_key)
    ax.set_ylabel("queries per second")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qinco", description="QINCo Search: neural vector compression and search")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    parser.add_argument("--device", default=os.environ.get("QINCO_DEVICE", "auto"),
                        help="train, encode and build on auto (a GPU where torch sees one), cpu, cuda or cuda:N "
                             "(default: $QINCO_DEVICE, else auto); several GPUs or machines: torchrun to train, "
                             "--ray to encode (one actor per cluster GPU unless cpu)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a QINCo model on a vector file")
    p.add_argument("data", help=".npy (float32/float16/uint8), .fvecs or .bvecs")
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    p.add_argument("--bytes", type=int, default=8, help="code bytes per vector (default 8)")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (default 0: no IVF step)")
    p.add_argument("--max-minutes", dest="max_minutes", type=float, help="time budget (default 60)")
    p.add_argument("--max-vectors", dest="max_vectors", type=int,
                   help="stop after seeing N training vectors; the schedule then runs over vectors, "
                        "so a run is reproducible on any machine (default 0: the time budget alone)")
    p.add_argument("--resume", action="store_true", help="continue training the model in --out")
    p.add_argument("--limit", type=int, help="use only the first N vectors")
    arch = QincoConfig(d=1, M=1)
    p.add_argument("--K", type=int, default=arch.K, help="codewords per step (default 256)")
    p.add_argument("--L", type=int, default=arch.L, help="residual blocks per step (default 2)")
    p.add_argument("--h", type=int, default=arch.h, help="hidden width (default 256)")
    p.add_argument("--de", type=int, help=f"embedding width, 0: d (default {HIGH_D_WIDTH} from d = {HIGH_D} on, else 0)")
    p.add_argument("--rank", type=int, default=arch.rank, help="low-rank concatenation, QINCo-LR (default 0: off)")
    choices = {"init": INITS, "loss": LOSSES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES}
    for name, kind, help_ in [("A", int, "training pre-selection"), ("B", int, "training beam"),
                              ("lr", float, "learning rate"), ("batch", int, "batch size"),
                              ("seed", int, "random seed"), ("val", int, "validation vectors"),
                              ("reuse", int, "gradient passes over each encoded chunk"),
                              ("lr_codebooks", float, "base codebooks' learning rate, 0: --lr"),
                              ("optimizer", str, "adam or adamw"), ("weight_decay", float, "AdamW weight decay"),
                              ("schedule", str, "plateau or cosine (to 0 at --max-minutes)"),
                              ("warmup", int, "vectors of linear learning-rate warm-up"),
                              ("init", str, "base codebooks from faiss rq, lsq (LSQ++) or the best of both"),
                              ("lsq_iters", int, "LSQ++'s training iterations"),
                              ("stop_after", int, "validations without progress before the cosine goes back to the best "
                                                   "model, anneals to 0 and stops (plateau: stops), 0: never"),
                              ("grad_clip", float, "clip gradient values to +-this, 0: off"),
                              ("loss", str, "steps (QINCo's: every step's error), final (the last step's), steps-then-final "
                                                "(final once the cosine schedule stalls) or auto (from an LSQ++ start "
                                                "steps-then-final, or final without a stall to switch at; else steps)")]:
        flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])  # --lr_codebooks and --lr-codebooks
        p.add_argument(*flags, dest=name, type=kind, choices=choices.get(name),
                       help=f"{help_} (default {getattr(TrainConfig, name)})")
    p.add_argument("--no-seeds", dest="seeds", action="store_false", default=None,
                   help="an LSQ++ start without seed codes: the encoders' beam search alone")
    p.add_argument("--reset-dead", dest="reset_dead", action="store_true", default=None,
                   help="each epoch, give codewords that no code chose a random residual (QINCo2)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="write a benchmark data set's splits and ground truth as .npy files")
    p.add_argument("name", choices=datasets.NAMES)
    p.add_argument("--out", required=True, help="folder for learn.npy, base.npy, queries.npy, gt100.npy")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("encode", help="encode vectors into codes")
    p.add_argument("data")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="codes .npy: (n, M) uint8, or (n, M+1) with the IVF list first")
    p.add_argument("--int32", action="store_true", help="write int32 codes")
    add_encoder_args(p, "quality")
    add_ray_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode codes into vectors")
    p.add_argument("codes")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="float32 .npy")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("build", help="build an IVF-HNSW index from an IVF model and base vectors")
    p.add_argument("base")
    p.add_argument("--model", required=True, help="an IVF model (trained with --nlist)")
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--ids", help="int64 ids .npy, one per base vector (default: row numbers)")
    add_encoder_args(p, "balanced")
    add_ray_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("tune", help="sweep search parameters on held-out queries, store the Pareto front")
    p.add_argument("index")
    p.add_argument("queries")
    p.add_argument("--k", type=int, default=10, help="recall@k to tune for (default 10)")
    p.add_argument("--target-recall", dest="target_recall", type=float, help="print the parameters for this recall")
    add_ground_truth_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("search", help="k-NN search; writes an int64 (nq, k) id array")
    p.add_argument("index")
    p.add_argument("queries")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int)
    p.add_argument("--ef-search", dest="ef_search", type=int)
    p.add_argument("--nshort", type=int, help="candidates re-ranked by the neural decoder (0: none)")
    p.add_argument("--target-recall", dest="target_recall", type=float, help="use the tuned operating point")
    p.add_argument("--out", required=True)
    p.add_argument("--distances", help="also write float32 squared L2 distances here")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="recall@1/10/100 and QPS over a parameter grid")
    p.add_argument("index")
    p.add_argument("queries")
    p.add_argument("--plot", help="write a recall-vs-QPS PNG here")
    add_ground_truth_args(p)
    p.set_defaults(func=cmd_eval)
    return parser


def run(parser: argparse.ArgumentParser, argv=None):
    args = parser.parse_args(argv)
    set_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"qinco {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    run(build_parser(), argv)


if __name__ == "__main__":
    main()
