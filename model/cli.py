"""`qinco` command line: train, encode, decode (the service adds `serve`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import numpy as np
import torch
from tqdm.auto import tqdm

from . import io
from .network import ENCODERS, Encoder, QincoConfig, decode, encode
from .train import TrainConfig, train


def add_encoder_args(p: argparse.ArgumentParser):
    p.add_argument("--encoder", choices=sorted(ENCODERS), default="quality",
                   help="named encoder setting (default: quality); -A/-B override it")
    p.add_argument("-A", type=int, help="pre-selected candidates per beam")
    p.add_argument("-B", type=int, help="beam size")
    p.add_argument("--batch", type=int, default=1024)


def encoder_from_args(args) -> Encoder:
    base = ENCODERS[args.encoder]
    return Encoder(A=args.A or base.A, B=args.B or base.B)


def cmd_train(args):
    data = io.as_float32(io.read_vectors(args.data))
    if args.limit:
        data = data[:args.limit]
    if args.bytes * 8 % max(1, int(np.log2(args.K))) and not args.resume:
        raise SystemExit(f"--bytes {args.bytes} is not a whole number of {int(np.log2(args.K))}-bit steps")
    cfg = None
    if not args.resume:
        cfg = QincoConfig(d=data.shape[1], M=args.bytes * 8 // int(np.log2(args.K)), K=args.K, L=args.L,
                          h=args.h, de=args.de, rank=args.rank, nlist=args.nlist)
    tc_fields = {f.name for f in fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in tc_fields and v is not None})
    train(data, args.out, cfg, tc, resume=args.resume)
    print(f"saved {args.out}")


def cmd_encode(args):
    model = io.load_model(args.model)
    x = io.read_vectors(args.data, mmap=True)
    with tqdm(total=len(x), unit="vec", desc="encoding") as bar:
        codes = encode(model, x, encoder_from_args(args), args.batch, progress=bar)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qinco", description="QINCo Search: neural vector compression and search")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a QINCo model on a vector file")
    p.add_argument("data", help=".npy (float32/float16/uint8), .fvecs or .bvecs")
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    p.add_argument("--bytes", type=int, default=8, help="code bytes per vector (default 8)")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (default 0: no IVF step)")
    p.add_argument("--max-minutes", dest="max_minutes", type=float, help="time budget (default 60)")
    p.add_argument("--resume", action="store_true", help="continue training the model in --out")
    p.add_argument("--limit", type=int, help="use only the first N vectors")
    arch = QincoConfig(d=1, M=1)
    p.add_argument("--K", type=int, default=arch.K, help="codewords per step (default 256)")
    p.add_argument("--L", type=int, default=arch.L, help="residual blocks per step (default 2)")
    p.add_argument("--h", type=int, default=arch.h, help="hidden width (default 256)")
    p.add_argument("--de", type=int, default=arch.de, help="embedding width (default 0: d)")
    p.add_argument("--rank", type=int, default=arch.rank, help="low-rank concatenation, QINCo-LR (default 0: off)")
    for name, kind, help_ in [("A", int, "training pre-selection"), ("B", int, "training beam"),
                              ("lr", float, "learning rate"), ("batch", int, "batch size"),
                              ("seed", int, "random seed"), ("val", int, "validation vectors")]:
        p.add_argument(f"--{name}", type=kind, help=f"{help_} (default {getattr(TrainConfig, name)})")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="encode vectors into codes")
    p.add_argument("data")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="codes .npy: (n, M) uint8, or (n, M+1) with the IVF list first")
    p.add_argument("--int32", action="store_true", help="write int32 codes")
    add_encoder_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode codes into vectors")
    p.add_argument("codes")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="float32 .npy")
    p.set_defaults(func=cmd_decode)
    return parser


def run(parser: argparse.ArgumentParser, argv=None):
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"qinco {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    run(build_parser(), argv)


if __name__ == "__main__":
    main()
