"""Training recipes at equal budget: one `qinco train` per recipe, one after the other, same data.

Each recipe is a set of `qinco train` flags on top of the common ones (warm-up as the
self-training worker sets it, min(100,000, 5 n); no early stop); the table gives the validation MSE with the
recipe's training encoder and with the `balanced` encoder the collections use, on the same
held-out vectors, over faiss RQ's (beam 5) at the same bytes.

    python bench/recipe.py runs/wordnet/learn.npy --limit 20000 --minutes 10 --threads 1 \\
        --nlist 256 --h 128 --recipes base,a4,a4-adamw-cosine
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import io  # noqa: E402
from model.io import load_model  # noqa: E402
from model.network import ENCODERS  # noqa: E402
from model.train import split_learn, validation_mse  # noqa: E402

OLD = ["--A", "16", "--optimizer", "adam", "--schedule", "plateau", "--lr", "1e-4", "--lr_codebooks", "0",
       "--weight_decay", "0", "--de", "0"]  # the recipe before session 7 (blocks at width d)
COSINE = ["--optimizer", "adamw", "--schedule", "cosine", "--weight_decay", "0.1", "--lr_codebooks", "0"]
RECIPES = {
    "base": OLD,  # Adam 1e-4, plateau (lr / 10 after 3 stale validations), A=16 B=4
    "a4": OLD + ["--A", "4"],
    "adamw-cosine": OLD + COSINE,
    "a4-adamw-cosine": OLD + COSINE + ["--A", "4"],  # the default now
    "a4-adamw-cosine-lr5e-4": OLD + COSINE + ["--A", "4", "--lr", "5e-4", "--lr_codebooks", "1e-4"],
    "a4-adamw-cosine-lr1e-3": OLD + COSINE + ["--A", "4", "--lr", "1e-3", "--lr_codebooks", "1e-4"],
    "default": [],
    "de0": ["--de", "0"],  # the blocks at width d (the default below d = 256)
    "de128": ["--de", "128"],  # the blocks at width 128 (QINCo2's de; the default from d = 256 on)
    "rq": ["--init", "rq"],  # the start: faiss RQ's codebooks
    "lsq": ["--init", "lsq"],  # LSQ++'s codebooks (100 iterations), and its local-search codes as seeds
    "lsq-noseeds": ["--init", "lsq", "--no-seeds"],  # LSQ++'s codebooks, the beam search alone
    "lsq25": ["--init", "lsq", "--lsq-iters", "25"],  # LSQ++ trained as faiss's default does (the default to session 21)
    "lsq50": ["--init", "lsq", "--lsq-iters", "50"],  # the default of sessions 22-23
    # capacity for a small learn set, at 50 iterations (session 24: run with --h 256, the CLI's width)
    "lsq50-h128": ["--init", "lsq", "--lsq-iters", "50", "--h", "128"],  # half the hidden width
    "lsq50-wd1": ["--init", "lsq", "--lsq-iters", "50", "--weight-decay", "1.0"],  # 10x AdamW's weight decay
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bytes", type=int, default=8)
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--h", type=int, default=128)
    p.add_argument("--recipes", default="base,a4,a4-adamw-cosine")
    p.add_argument("--out", default="runs/recipes")
    args = p.parse_args()

    x = io.as_float32(io.read_vectors(args.data))
    n = args.limit or len(x)
    common = ["--bytes", str(args.bytes), "--nlist", str(args.nlist), "--h", str(args.h),
              "--max-minutes", str(args.minutes), "--warmup", str(min(100_000, 5 * n)),
              "--stop-after", "0"]  # the whole budget each: an early stop would make it unequal
    if args.limit:
        common += ["--limit", str(args.limit)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.recipes.split(","):
        path = out / f"{Path(args.data).parent.name}-{n}-{name}.safetensors"
        cmd = [sys.executable, "-m", "service.cli", "--threads", str(args.threads), "train", args.data,
               "--out", str(path), *common, *RECIPES[name]]
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        with open(path.with_suffix(".log"), "w") as log:  # the trainer logs to stdout, its bar to stderr
            subprocess.run(cmd, check=True, stdout=log, stderr=log)
        model, extra = load_model(path, with_extra=True)
        state, tc = extra["training"]["state"], extra["training"]["config"]
        # The collections' encoder on the same held-out vectors as the training's validation.
        _, xval = split_learn(x[:n], tc["val"], tc["seed"])
        xv = model.normalize(torch.from_numpy(xval))
        balanced = validation_mse(model, xv, model.assign(xv) if model.cfg.nlist else None, ENCODERS["balanced"])
        rq, lsq = state["rq_val_mse"], state.get("lsq_val_mse", float("nan"))  # LSQ++ with its own encoder
        rows.append((name, (time.time() - t0) / 60, state["vectors_seen"], state["init"], lsq / rq,
                     state["init_val_mse"] / rq, state["best_val_mse"] / rq, balanced / rq,
                     " ".join(f"{m:.0f}:{v / rq:.3f}" for m, v in state["history"])))
        print(f"{name}: {rows[-1][1]:.1f} min, {rows[-1][2]:,} vectors, start {rows[-1][3]} {rows[-1][5]:.4f}x RQ "
              f"(LSQ++ {rows[-1][4]:.4f}x), train-encoder {rows[-1][6]:.4f}x RQ, balanced {rows[-1][7]:.4f}x RQ  "
              f"history {rows[-1][8]}", flush=True)
    print("\n| recipe | minutes | vectors seen | start | LSQ++ own encoder / RQ | start / RQ | "
          "val MSE / RQ (training encoder) | val MSE / RQ (balanced) | history (min: ratio) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:,} | {r[3]} | {r[4]:.4f} | {r[5]:.4f} | {r[6]:.4f} | {r[7]:.4f} | {r[8]} |")


if __name__ == "__main__":
    main()
