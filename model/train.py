"""Training: k-means (IVF) and faiss RQ initialisation, then Adam on the QINCo loss.

The loss is the sum over steps of ||x - x̂(m)||², so every code prefix is a
valid lower-rate code.  Codes are searched without gradient (pre-selection +
beam search, the expensive part), then the network is evaluated once per step
on the chosen codewords with gradient: the backward pass costs one decode.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .codebooks import fit_model_tables
from .io import load_model, save_model
from .network import ENCODERS, Encoder, Qinco, QincoConfig, check_vectors
from .seeds import possible as seeds_possible
from .scan import native_bf16
from .threads import set_threads


LSQ_ITERS = 25  # faiss's default train_iters of LSQ++


@dataclass
class TrainConfig:
    max_minutes: float = 60.0  # wall-clock budget, initialisation included
    # Training vectors to see (0: no limit).  When set, the warm-up and the cosine run over
    # vectors, not time, so the same data, seed and count give the same model on any machine
    # (max_minutes still stops a run that is too slow).
    max_vectors: int = 0
    # Base codebooks at step 0, where QINCo is an additive quantizer (its branches start at zero):
    # "rq" faiss ResidualQuantizer, "lsq" faiss LocalSearchQuantizer (LSQ++), "best" both, keeping
    # the one whose codebooks the training encoder searches better on the validation set, LSQ++'s
    # only by LSQ_MARGIN.  On wordnet-384 LSQ++'s start won by far (60 min: 0.860x RQ's MSE against
    # 0.911x, RESULTS); on glove-50 it won by 0.2% and trained worse, so "best" keeps RQ's there,
    # at the cost of training both.
    init: str = "best"
    # LSQ++'s training iterations: 4x faiss's default (LSQ_ITERS).  Its codebooks are worth more
    # than the network's minutes: on the 1M MiniLM learn split 50 iterations gave 0.819x RQ's
    # validation MSE against 25's 0.837x (session 22); on wordnet in 15-minute jobs, 100 gave
    # 0.819x against 50's 0.830x with `balanced` (session 24; bench/RESULTS.md).
    lsq_iters: int = 4 * LSQ_ITERS
    # An LSQ++ start keeps LSQ++'s codebooks as the model's seed codebooks: every seeded encoder
    # (training's included) also tries their local-search codes, so the model starts as good as
    # LSQ++ with its own encoder (`Qinco.seed_codes`).  False: the beam search alone.
    seeds: bool = True
    # The recipe: bench/RESULTS.md "Training recipe" (equal-budget comparisons, a held-out set).
    A: int = 4  # pre-selected candidates per beam while training (A=16: 2.2x slower, worse per minute)
    B: int = 4  # beams while training
    lr: float = 1e-4  # the peak rate (5e-4 won on wordnet-20k but made fashion-mnist-20k worse: RESULTS)
    lr_codebooks: float = 0.0  # rate of the steps' base codebooks (0: lr)
    optimizer: str = "adamw"  # "adam" | "adamw"
    weight_decay: float = 0.1  # AdamW's decoupled decay (network weights only)
    schedule: str = "cosine"  # "cosine": to 0 at the budget; "plateau": lr /= 10 after `patience` stale validations
    batch: int = 256
    chunk_batches: int = 8  # batches encoded together before the gradient passes
    reuse: int = 4  # gradient passes over each encoded chunk
    seed: int = 0
    val: int = 0  # held-out vectors for validation, taken from the data (0: min(5000, n / 10))
    eval_every: int = 0  # training vectors between validations (0: an epoch, within [5,000, 50,000])
    warmup: int = 100_000  # training vectors of linear learning-rate warm-up
    patience: int = 3  # validations without progress before lr /= 10 (or stopping at min_lr)
    min_lr: float = 1e-6
    kmeans_iters: int = 20
    table_sample: int = 100_000  # IVF models: vectors encoded to fit the index's fixed tables (more is better)
    threads: int = 0  # 0: all cores
    bf16: bool | None = None  # bf16 autocast for the code search (and, on CUDA, the network); None: on CUDA
    #                           and on CPUs with bf16 hardware
    device: str = "auto"  # auto | cpu | cuda[:N] (model/distributed.py; several processes: torchrun)
    # After this many validations without progress past the warm-up (0: never), the cosine schedule
    # goes back to the best model and anneals to 0 over as many validations' vectors, then stops (the
    # plateau schedule stops at once).
    # The best model is kept anyway.  On 36k wordnet vectors the best came at 17 of 60 minutes; on
    # glove-50 the run stopped with the learning rate at half its peak (bench/RESULTS.md, session 25),
    # before the low rates where a cosine makes most of its gain: a stall ends in an anneal.
    stop_after: int = 10
    grad_clip: float = 0.0  # clip each gradient value to [-grad_clip, grad_clip] (QINCo2: 0.1; 0: off)
    reset_dead: bool = False  # each epoch, codewords no code chose get a random residual of that step
    # "steps": QINCo's loss, the sum of every step's reconstruction error (what a residual beam search
    # needs); "final": the last step's alone.  LSQ++'s codes are not residual (their partial sums are
    # poor), so under "steps" a model started from them trades its final error for the partial ones:
    # from LSQ++'s start, "final" improved every validation where "steps" improved none (bench/RESULTS.md,
    # session 26).  "steps-then-final": "steps" until the run stalls, then "final" for the anneal: on
    # wordnet that was 0.6% better than "final" throughout, which overfits sooner (session 27).
    # "auto": "steps-then-final" from LSQ++'s start ("final" where no stall would switch), "steps"
    # from RQ's (`resolve_loss`).
    # "final" has fewer terms, hence smaller gradients: a grad_clip clips less under it.
    loss: str = "auto"


@dataclass
class TrainState:
    """What --resume needs, stored in the checkpoint's metadata."""

    lr: float
    best_val_mse: float = math.inf  # raw-space MSE with the training encoder
    vectors_seen: int = 0
    seconds: float = 0.0
    stale: int = 0
    history: list = field(default_factory=list)  # (minutes, val_mse)
    rq_val_mse: float = math.nan  # faiss RQ beam 5 on the same validation set
    lsq_val_mse: float = math.nan  # faiss LSQ++ with its own encoder (when it was trained)
    init_val_mse: float = math.nan
    init: str = "rq"  # the codebooks training started from
    since_best: int = 0  # validations since the best one
    dead_reset: int = 0  # codewords reset (reset_dead)
    annealed_at: int = 0  # vectors seen when a stall started the cosine's early anneal (0: none)


INITS = ("rq", "lsq", "best")
LOSSES = ("auto", "steps", "final", "steps-then-final")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("plateau", "cosine")
LSQ_VS_RQ = 3.5  # LSQ++'s training time (LSQ_ITERS) over RQ's (beam 5): 3.3x measured at d = 384, 2.1x at d = 784
# `best` keeps LSQ++'s start only when it searches this much better than RQ's: on glove-50 it won
# by 0.2% at step 0 and then trained worse than RQ's start (bench/RESULTS.md, session 25); on the
# 384-d text sets it wins by 13-18%.
LSQ_MARGIN = 0.01


def log(msg: str):
    if distributed.rank_world()[0] == 0:  # several processes: rank 0 speaks for them
        tqdm.write(msg)


def split_learn(x: np.ndarray, val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    val = val or min(5000, len(x) // 10)
    if not 0 < val < len(x) // 2:
        raise ValueError(f"--val must be between 1 and half the data ({len(x) // 2}), got {val}")
    perm = np.random.default_rng(seed).permutation(len(x))
    return x[perm[val:]], x[perm[:val]]


def check_data(n: int, cfg: QincoConfig) -> None:
    """Enough training vectors (besides the validation ones) for k-means and the codebooks:
    faiss would abort with a C++ traceback."""
    if cfg.nlist > n:
        raise ValueError(f"nlist={cfg.nlist} needs at least that many training vectors, got {n}")
    if n < cfg.K:
        raise ValueError(f"training needs at least K={cfg.K} vectors besides the validation ones, got {n}")


def train_centroids(xn: np.ndarray, nlist: int, iters: int, seed: int) -> np.ndarray:
    km = faiss.Kmeans(xn.shape[1], nlist, niter=iters, seed=seed, max_points_per_centroid=256)
    km.train(xn)
    return km.centroids


def train_rq(residuals: np.ndarray, cfg: QincoConfig) -> faiss.ResidualQuantizer:
    rq = faiss.ResidualQuantizer(cfg.d, cfg.M, cfg.nbits)
    rq.max_beam_size = 5
    rq.train(residuals)
    return rq


def rq_codebooks(rq: faiss.ResidualQuantizer, cfg: QincoConfig) -> np.ndarray:
    return faiss.vector_to_array(rq.codebooks).reshape(cfg.M, 1 << cfg.nbits, cfg.d)[:, :cfg.K]


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).sum(1).mean())


@torch.inference_mode()
def validation_mse(model: Qinco, xval: torch.Tensor, lval, encoder: Encoder, batch: int = 1024,
                   shared: bool = False, seeds: torch.Tensor | None = None) -> float:
    """Raw-space MSE of normalised validation vectors; shared: each process encodes its share.
    seeds: their seed codes, when the caller has them."""
    if encoder.seeded and seeds is None:
        seeds = model.seed_codes(xval, lval, encoder.seed_rounds)
    part = distributed.share(len(xval)) if shared else slice(None)
    xval, lval = xval[part], None if lval is None else lval[part]
    seeds = None if seeds is None else seeds[part]
    total = 0.0
    for i0 in range(0, len(xval), batch):
        xb = xval[i0:i0 + batch]
        _, xhat = model.encode_normalized(xb, encoder, None if lval is None else lval[i0:i0 + batch],
                                          seeds=None if seeds is None else seeds[i0:i0 + batch])
        total += float((xb - xhat).square().sum())
    total, n = distributed.sum_all([total, len(xval)], xval.device) if shared else (total, len(xval))
    return total / n * float(model.scale) ** 2


def train_lsq(residuals: np.ndarray, cfg: QincoConfig, seed: int, iters: int
              ) -> faiss.LocalSearchQuantizer:
    """faiss's LSQ++ with its default settings but `iters`, its train_iters."""
    lsq = faiss.LocalSearchQuantizer(cfg.d, cfg.M, cfg.nbits)
    lsq.random_seed, lsq.train_iters = seed, iters
    lsq.train(residuals)
    return lsq


def lsq_codebooks(lsq: faiss.LocalSearchQuantizer, cfg: QincoConfig) -> np.ndarray:
    """LSQ's M tables (M, K, d), largest energy first: the order a step-by-step search wants."""
    tables = faiss.vector_to_array(lsq.codebooks).reshape(cfg.M, 1 << cfg.nbits, cfg.d)[:, :cfg.K]
    return tables[np.argsort(-(tables ** 2).sum((1, 2)), kind="stable")]


def lsq_iterations(wanted: int, elapsed: float, rq_seconds: float, budget: float) -> int:
    """LSQ++'s iterations under init "best": `wanted`, or the first of wanted / 2, wanted / 4, ...
    down to faiss's default LSQ_ITERS that would likely end within half the budget, or 0 (skipped)
    where even LSQ_ITERS would not; the time it takes is estimated as LSQ_VS_RQ times RQ's per
    LSQ_ITERS iterations, after `elapsed` seconds."""
    iters = wanted
    while elapsed + LSQ_VS_RQ * iters / LSQ_ITERS * rq_seconds > budget / 2:
        if iters <= LSQ_ITERS:
            return 0
        iters = max(LSQ_ITERS, iters // 2)
    return iters


def initialise(x: np.ndarray, xval: np.ndarray, cfg: QincoConfig, tc: TrainConfig, budget: float = math.inf
               ) -> tuple[Qinco, TrainState, dict[str, np.ndarray]]:
    """A model at step 0 (an additive quantizer), the state with the faiss baselines' validation
    MSE, and the candidate base codebooks by name (tc.init: "rq", "lsq" or both).

    LSQ++ cannot be interrupted: with init "best" it may train for fewer iterations, or be
    skipped, in a short `budget` (`lsq_iterations`).  A quarter skipped it at d = 384 in 12
    minutes, where its start still won by 7% of MSE (bench/RESULTS.md, session 16); at d = 784 it
    would take most of any budget, and is skipped."""
    check_data(len(x), cfg)
    model = Qinco(cfg)
    mean = x.mean(0)
    scale = float(np.sqrt(((x - mean) ** 2).sum(1).mean() / cfg.d))  # per-coordinate RMS
    model.mean.copy_(torch.from_numpy(mean))
    model.scale.fill_(scale)
    xn, valn = (x - mean) / scale, (xval - mean) / scale
    t_start = time.time()
    if cfg.nlist:
        t0 = time.time()
        model.set_centroids(torch.from_numpy(train_centroids(xn, cfg.nlist, tc.kmeans_iters, tc.seed)))
        log(f"k-means: {cfg.nlist} centroids in {time.time() - t0:.0f}s")
        xn = xn - model.centroids[model.assign(torch.from_numpy(xn))].numpy()
        valn = valn - model.centroids[model.assign(torch.from_numpy(valn))].numpy()
    xn = np.ascontiguousarray(xn, dtype=np.float32)
    valn = np.ascontiguousarray(valn, dtype=np.float32)
    state = TrainState(lr=tc.lr)
    t0 = time.time()
    rq = train_rq(xn, cfg)  # always: RQ's MSE is the reference every ratio is given against
    state.rq_val_mse = mse(valn, rq.decode(rq.compute_codes(valn))) * scale ** 2
    log(f"faiss RQ {cfg.M}x{cfg.nbits} (beam 5) in {time.time() - t0:.0f}s, validation MSE {state.rq_val_mse:.5g}")
    candidates = {"rq": rq_codebooks(rq, cfg)} if tc.init in ("rq", "best") else {}
    fits = lsq_iterations(tc.lsq_iters, time.time() - t_start, time.time() - t0, budget)
    iters = tc.lsq_iters if tc.init == "lsq" else fits  # --init lsq: as many as asked, whatever the budget
    if iters > fits:
        log(f"faiss LSQ++: {iters} iterations (--init lsq) will likely take over half the {budget:.0f}s budget")
    if tc.init == "best" and not iters:
        log(f"faiss LSQ++ skipped: even {min(tc.lsq_iters, LSQ_ITERS)} iterations would likely end past half "
            f"the {budget:.0f}s budget")
    elif tc.init in ("lsq", "best"):
        t0 = time.time()
        lsq = train_lsq(xn, cfg, tc.seed, iters)
        state.lsq_val_mse = mse(valn, lsq.decode(lsq.compute_codes(valn))) * scale ** 2
        log(f"faiss LSQ++ {cfg.M}x{cfg.nbits} ({iters} iterations) in {time.time() - t0:.0f}s, validation MSE {state.lsq_val_mse:.5g} "
            f"({state.lsq_val_mse / state.rq_val_mse:.3f} x RQ)")
        candidates["lsq"] = lsq_codebooks(lsq, cfg)
    return model, state, candidates


def set_codebooks(model: Qinco, codebooks: np.ndarray) -> None:
    with torch.no_grad():
        for step, cb in zip(model.steps, codebooks):
            step.codebook.copy_(torch.from_numpy(cb))


def make_optimizer(model: Qinco, tc: TrainConfig) -> torch.optim.Optimizer:
    """Two groups: the base codebooks (lr_codebooks) and the network (lr, with weight decay)."""
    codebooks = [p for n, p in model.named_parameters() if n.endswith("codebook")]
    network = [p for n, p in model.named_parameters() if not n.endswith("codebook")]
    groups = [{"params": codebooks, "base_lr": tc.lr_codebooks or tc.lr, "weight_decay": 0.0},
              {"params": network, "base_lr": tc.lr, "weight_decay": tc.weight_decay}]
    for g in groups:
        g["lr"] = g["base_lr"]
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.Adam([{k: v for k, v in g.items() if k != "weight_decay"} for g in groups])


def warmup_vectors(tc: TrainConfig) -> int:
    """Vectors of linear warm-up: `warmup`, at most a tenth of max_vectors when that is set."""
    return min(tc.warmup, tc.max_vectors // 10) if tc.max_vectors else tc.warmup


def lr_factor(tc: TrainConfig, vectors_seen: int, elapsed: float, budget: float) -> float:
    """Linear warm-up over `warmup` vectors, then 1 (plateau) or a cosine that reaches 0 at the
    budget: at max_vectors when it is set (at most a tenth of them warm up), else at `budget` seconds."""
    warm = min(1.0, vectors_seen / max(1, warmup_vectors(tc)))
    if tc.schedule == "plateau" or warm < 1.0:
        return warm
    done = vectors_seen / tc.max_vectors if tc.max_vectors else elapsed / max(budget, 1e-9)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def anneal_factor(start: int, end: int, factor: float, vectors_seen: int) -> float:
    """The cosine's early anneal after a stall: from `factor` at `start` vectors to 0 at `end`."""
    done = min(1.0, max(0, vectors_seen - start) / max(1, end - start))
    return factor * 0.5 * (1 + math.cos(math.pi * done))


def anneal_end(tc: TrainConfig, vectors_seen: int, eval_every: int, vectors_left: float) -> int:
    """Where an anneal that starts now ends: `stop_after` validations later, sooner where the
    budget would end first (`vectors_left`: what it likely leaves, in vectors; max_vectors)."""
    left = min(tc.stop_after * eval_every, vectors_left)
    if tc.max_vectors:
        left = min(left, tc.max_vectors - vectors_seen)
    return vectors_seen + max(1, int(left))


def train(data, out, cfg: QincoConfig | None = None, tc: TrainConfig = TrainConfig(),
          resume: bool = False, progress=None, report: bool = True) -> Qinco:
    """Train a QINCo model on raw vectors `data` (n, d) and save it to `out`.

    The best model by validation MSE is saved after every improvement, so an
    interrupted run leaves a usable file; `resume` continues from it.
    progress(state, elapsed seconds, budget seconds), if given, is called after every chunk.
    report: end with the table of validation MSEs per encoder (the quality encoder's is slow).
    Under torch.distributed (torchrun), every process calls this with the same data and
    arguments; rank 0 initialises, reports and saves (model/distributed.py).
    """
    start = time.time()
    check_config(tc)
    device = distributed.resolve_device(tc.device)
    rank, world = distributed.rank_world()
    budget = tc.max_minutes * 60
    set_threads(tc.threads)
    torch.manual_seed(tc.seed)
    out = Path(out)
    x = np.asarray(data)
    if x.ndim != 2:
        raise ValueError(f"training data must be 2-D (n, d), got shape {x.shape}")
    x = check_vectors(x, x.shape[1], "training vectors")
    if cfg is not None and not resume and cfg.d != x.shape[1]:
        raise ValueError(f"expected dim {cfg.d}, got {x.shape[1]}")
    xtrain, xval = split_learn(x, tc.val, tc.seed)
    switched = False  # a resumed steps-then-final run already in its final phase
    train_encoder = Encoder(A=tc.A, B=tc.B)

    if resume:
        model, extra = load_model(out, with_extra=True)
        if model.cfg.d != x.shape[1]:
            raise ValueError(f"expected dim {model.cfg.d}, got {x.shape[1]}")
        state = TrainState(**extra["training"]["state"])
        switched = state.annealed_at > 0  # a steps-then-final run that reached its final phase goes on in it
        state.since_best = state.annealed_at = 0  # a resumed run gets its own --stop-after and anneal
        stored = extra["training"].get("config", {}).get("loss", "steps")  # older files: QINCo's loss
        tc = replace(tc, loss=stored if tc.loss == "auto" else tc.loss)  # a resume keeps its loss
        check_config(tc)
        if stored != tc.loss:
            log(f"resuming with loss {tc.loss!r}; {out} was trained with {stored!r}")
        cfg = model.cfg
        if not tc.seeds:
            model.set_seed_codebooks(None)
        log(f"resuming {out}: {state.seconds / 60:.1f} min done, best validation MSE {state.best_val_mse:.5g}")
    else:
        if cfg is None:
            raise ValueError("a new model needs a QincoConfig")
        if cfg.d != x.shape[1]:
            raise ValueError(f"expected dim {cfg.d}, got {x.shape[1]}")
        check_data(len(xtrain), cfg)  # in every process: a bad set fails everywhere, none waits for rank 0
        if rank == 0:
            try:
                model, state, candidates = initialise(xtrain, xval, cfg, tc, budget)
                choose_start(model, state, candidates, model.normalize(torch.from_numpy(xval)), train_encoder,
                             tc.seeds)
            except Exception as e:
                if world == 1:
                    raise
                model, state = Qinco(cfg), e  # the others raise it too, instead of waiting
        else:
            model, state = Qinco(cfg), None
        state = distributed.broadcast_state(model, state, device)
        tc = replace(tc, loss=resolve_loss(tc, state.init))  # stored resolved: what a resume keeps
        log(f"loss: {tc.loss} (the start is {state.init.upper()}'s)")

    # The coarse assignment runs in faiss, on the CPU; then everything moves to the device.
    xt = model.normalize(torch.from_numpy(xtrain))
    xv = model.normalize(torch.from_numpy(xval))
    lt = model.assign(xt) if cfg.nlist else None
    lv = model.assign(xv) if cfg.nlist else None
    # Seed codes depend only on the fixed seed codebooks: found once, on the CPU (faiss; every
    # process finds all of them, rather than exchange them).
    seeds_v = model.seed_codes(xv, lv, train_encoder.seed_rounds) if train_encoder.seeded else None
    t0 = time.time()
    seeds_t = model.seed_codes(xt, lt, train_encoder.seed_rounds) if train_encoder.seeded else None
    # What a vector's seed costs (the tables' encode below finds them again): one figure for all processes.
    seed_seconds = distributed.mean_all([(time.time() - t0) / len(xt)], device)[0]
    xt, xv, lt, lv, seeds_t, seeds_v = [None if t is None else t.to(device) for t in (xt, xv, lt, lv, seeds_t, seeds_v)]
    model.to(device).train()
    net = distributed.wrap(model, device)
    bf16 = (device.type == "cuda" or native_bf16()) if tc.bf16 is None else tc.bf16
    optimizer = make_optimizer(model, tc)
    best = cpu_copy(model)
    lead = rank == 0
    saved = Qinco(cfg) if lead else None  # the CPU model each checkpoint writes `best` through

    def checkpoint():
        if not lead:
            return
        state.seconds = prior + time.time() - start
        extra = {"training": {"config": asdict(tc), "state": asdict(state), "n_train": len(xtrain)}}
        saved.load_state_dict(best)
        save_model(saved, out, extra)

    prior = state.seconds
    t0 = time.time()
    val = validation_mse(model, xv, lv, train_encoder, shared=True, seeds=seeds_v)
    val_seconds = distributed.mean_all([time.time() - t0], device)[0]  # one budget in every process
    eval_every = tc.eval_every or min(50_000, max(5_000, len(xtrain)))
    # IVF models end by encoding a sample for the index tables: keep time for it.
    n_tables = min(tc.table_sample, len(xtrain)) if cfg.nlist else 0
    budget -= 1.5 * n_tables * (val_seconds * world / len(xv) + seed_seconds)
    if not resume:
        state.init_val_mse = state.best_val_mse = val
        state.history.append((round((time.time() - start) / 60, 2), val))
        log(f"QINCo at initialisation (A={tc.A}, B={tc.B}): validation MSE {val:.5g}")
        checkpoint()
    if progress is not None and lead:
        progress(state, time.time() - start, budget)

    gen = torch.Generator().manual_seed(tc.seed + state.vectors_seen)  # the same sequence in every process
    bar = tqdm(total=round(budget), unit="s", desc="training", dynamic_ncols=True, disable=not lead,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}s [ETA {remaining}] {postfix}")
    bar.update(round(time.time() - start))
    since_eval, stop = 0, False
    anneal = None  # (start, end, factor): the cosine's early anneal after a stall, in vectors seen
    seen_before = state.vectors_seen  # for the training loop's rate, from loop_start (one in every process)
    loop_start = distributed.mean_all([time.time() - start], device)[0]
    # The loss until a stall (steps-then-final: "steps" unless a resumed run had already switched).
    phase = replace(tc, loss=("final" if switched else "steps") if tc.loss == "steps-then-final" else tc.loss)
    chunk = min(tc.batch * tc.chunk_batches, len(xt))
    mine = distributed.share(chunk)  # this process's share of every chunk (all of it in one process)
    batch = max(1, tc.batch // world)
    usage = torch.zeros(cfg.M, cfg.K, dtype=torch.long, device=device)
    while not stop:
        perm = torch.randperm(len(xt), generator=gen)
        for c0 in range(0, len(perm) - chunk + 1, chunk):
            chunk_start = time.time()
            rows = perm[c0:c0 + chunk][mine].to(device)
            xc, lc = xt[rows], None if lt is None else lt[rows]
            codes = search_codes(model, xc, lc, train_encoder, tc.batch, bf16, device,
                                 None if seeds_t is None else seeds_t[rows])
            if tc.reset_dead:
                usage += torch.bincount((codes + torch.arange(cfg.M, device=device) * cfg.K).flatten(),
                                        minlength=cfg.M * cfg.K).view(cfg.M, cfg.K)
            clock = distributed.mean_all([time.time() - start], device)[0]  # one schedule in every process
            factor = lr_factor(tc, state.vectors_seen + chunk, clock, budget)
            if anneal is not None:  # never above the cosine it cuts short
                factor = min(factor, anneal_factor(*anneal, state.vectors_seen + chunk))
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * (state.lr / tc.lr) * factor  # state.lr: after plateau cuts
            loss = gradient_passes(net, optimizer, xc, codes, lc, phase, batch, gen, bf16 and device.type == "cuda")
            state.vectors_seen += len(xc) * world
            since_eval += len(xc) * world
            elapsed = time.time() - start
            if progress is not None and lead:
                progress(state, elapsed, budget)
            bar.update(max(0, round(elapsed) - bar.n))
            steps_in_loss = 1 if phase.loss == "final" else cfg.M
            bar.set_postfix_str(f"step-mean MSE={loss * float(model.scale) ** 2 / steps_in_loss:.4g} "
                                f"val={state.best_val_mse:.5g} lr={optimizer.param_groups[0]['lr']:.1e}", refresh=False)
            # Stop when one more chunk and a last validation would overrun the budget.
            stop = elapsed + 1.2 * (time.time() - chunk_start) + 1.1 * val_seconds > budget
            stop = stop or bool(tc.max_vectors and state.vectors_seen >= tc.max_vectors)
            annealed = bool(anneal and state.vectors_seen >= anneal[1])
            stop = distributed.any_process(stop or annealed, device)
            if since_eval >= eval_every or (stop and since_eval > 0):
                t0 = time.time()
                val = validation_mse(model, xv, lv, train_encoder, shared=True, seeds=seeds_v)
                val_seconds, since_eval = distributed.mean_all([time.time() - t0], device)[0], 0
                state.history.append((round((time.time() - start + prior) / 60, 2), val))
                if val < state.best_val_mse * (1 - 1e-4):
                    state.best_val_mse, state.stale, state.since_best = val, 0, 0
                    best = cpu_copy(model)
                    checkpoint()
                # (leaving the start costs a little at first: no stall counts in the warm-up; an
                # anneal ends at its own end)
                elif state.vectors_seen > warmup_vectors(tc) and schedule_after_stale(state, tc) and anneal is None:
                    if tc.schedule == "cosine" and not stop:
                        # What the budget leaves for it, less the margin of the budget's stop (above).
                        now, chunk_seconds = distributed.mean_all([time.time() - start, time.time() - chunk_start],
                                                                  device)
                        left = budget - now - 1.2 * chunk_seconds - 1.1 * val_seconds
                        rate = (state.vectors_seen - seen_before) / max(now - loop_start, 1e-9)
                        end = anneal_end(tc, state.vectors_seen, eval_every, rate * max(0.0, left))
                        anneal = (state.vectors_seen, end, factor)
                        state.annealed_at, state.since_best = state.vectors_seen, 0
                        # The same in every process (`best` follows the shared validation).  AdamW's moments
                        # are kept: so measured (bench/RESULTS.md, session 27).
                        model.load_state_dict(best)
                        if tc.loss == "steps-then-final":
                            phase = replace(tc, loss="final")
                        log(f"no progress in {tc.stop_after} validations: from the best model, annealing the learning "
                            f"rate to 0 over {end - state.vectors_seen} vectors with the {phase.loss} loss, then stopping")
                    elif not stop:
                        if tc.stop_after and state.since_best >= tc.stop_after:
                            log(f"no progress in {state.since_best} validations: early stop")
                        stop = True
                if annealed:
                    log("the learning rate is annealed to 0: stopping")
                log(f"{(time.time() - start + prior) / 60:5.1f} min  {state.vectors_seen:>9} vectors  "
                    f"validation MSE {val:.5g} (best {state.best_val_mse:.5g}, lr {optimizer.param_groups[0]['lr']:.1e})")
            if stop:
                break
        else:  # an epoch ended
            if tc.reset_dead:
                state.dead_reset += reset_dead_codewords(model, optimizer, distributed.sum_tensor(usage), xc, codes,
                                                         lc, gen)
            usage.zero_()
    bar.close()
    model.load_state_dict(best)
    model.cpu().eval()
    if cfg.nlist and lead:
        t0 = time.time()
        # Fitted to the codes of the index's default encoder: the codes the tables will score.
        table_mse = fit_model_tables(model, xtrain[:n_tables], ENCODERS["balanced"])
        log(f"fixed tables (approximate decoder) fitted on {n_tables} vectors in {time.time() - t0:.0f}s: "
            f"MSE {table_mse:.5g}")
        best = cpu_copy(model)
    checkpoint()
    if report and lead:
        summarize(model, xv.cpu(), None if lv is None else lv.cpu(), state)
    return model


def check_config(tc: TrainConfig) -> None:
    if tc.optimizer not in OPTIMIZERS or tc.schedule not in SCHEDULES or tc.lr <= 0:
        raise ValueError(f"optimizer must be adam or adamw, schedule plateau or cosine, lr > 0; got {tc.optimizer!r}, "
                         f"{tc.schedule!r}, {tc.lr}")
    if tc.max_vectors < 0 or tc.max_minutes <= 0:
        raise ValueError(f"max_vectors must be >= 0 and max_minutes > 0, got {tc.max_vectors}, {tc.max_minutes}")
    if tc.init not in INITS or not 1 <= tc.lsq_iters <= 1000:
        raise ValueError(f"init must be one of {', '.join(INITS)} and lsq_iters in [1, 1000], got {tc.init!r}, "
                         f"{tc.lsq_iters}")
    if tc.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {tc.loss!r}")
    if tc.loss == "steps-then-final" and (tc.schedule != "cosine" or not tc.stop_after):
        raise ValueError("loss steps-then-final switches at a stall of the cosine schedule: it needs schedule "
                         "cosine and stop_after > 0")
    if tc.stop_after < 0 or tc.grad_clip < 0:
        raise ValueError(f"stop_after and grad_clip must be >= 0, got {tc.stop_after}, {tc.grad_clip}")


def resolve_loss(tc: TrainConfig, init: str) -> str:
    """The loss a run trains with: "auto" is "steps-then-final" from LSQ++'s start (its codes are not
    residual), "final" there where no stall would switch it (the plateau schedule, stop_after 0),
    and "steps" from RQ's."""
    if tc.loss != "auto":
        return tc.loss
    if init != "lsq":
        return "steps"
    return "steps-then-final" if tc.schedule == "cosine" and tc.stop_after else "final"


def cpu_copy(model: Qinco) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def choose_start(model: Qinco, state: TrainState, candidates: dict[str, np.ndarray], xv: torch.Tensor,
                 encoder: Encoder, seeds: bool = True) -> None:
    """Keep the candidate codebooks that the training encoder searches best on the validation set,
    LSQ++'s only by a margin over RQ's (LSQ_MARGIN); seeds: LSQ++'s are also the model's seed codebooks."""
    cfg = model.cfg
    lv = model.assign(xv) if cfg.nlist else None
    if seeds and not seeds_possible(cfg.M, cfg.K):
        log(f"no seed codes: LSQ++'s encoder needs K a power of 2 and M <= 32 at K = 256 (M={cfg.M}, K={cfg.K})")
        seeds = False
    scores = {}
    for name, codebooks in candidates.items():
        set_codebooks(model, codebooks)
        model.set_seed_codebooks(codebooks if seeds and name == "lsq" else None)
        if len(candidates) > 1:
            scores[name] = validation_mse(model, xv, lv, encoder)
            log(f"QINCo from {name.upper()} codebooks (A={encoder.A}, B={encoder.B}): validation MSE {scores[name]:.5g}")
    state.init = min(scores, key=scores.get) if scores else next(iter(candidates))
    if state.init == "lsq" and "rq" in scores and scores["lsq"] > scores["rq"] * (1 - LSQ_MARGIN):
        log(f"LSQ++'s start is less than {LSQ_MARGIN:.0%} better than RQ's: starting from RQ's")
        state.init = "rq"
    set_codebooks(model, candidates[state.init])
    model.set_seed_codebooks(candidates["lsq"] if seeds and state.init == "lsq" else None)


def search_codes(model: Qinco, xc: torch.Tensor, lc, encoder: Encoder, batch: int, bf16: bool,
                 device: torch.device, seeds: torch.Tensor | None = None) -> torch.Tensor:
    """The training codes of a chunk: no gradient, bf16 where it pays (24x slower where a CPU
    emulates it: 13 vs 307 vectors/s at d=384, A=16 B=4).  A GPU searches the chunk at once.
    seeds: the chunk's seed codes (the model's, computed once)."""
    step = len(xc) if device.type == "cuda" else batch
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return torch.cat([model.encode_normalized(xc[i:i + step], encoder, None if lc is None else lc[i:i + step],
                                                  seeds=None if seeds is None else seeds[i:i + step])[0]
                          for i in range(0, len(xc), step)])


def qinco_loss(net: torch.nn.Module, xb: torch.Tensor, codes: torch.Tensor, lists, final: bool = False
               ) -> torch.Tensor:
    """Sum over steps of the mean squared error of that step's reconstruction (normalised space);
    `final`: the last step's alone."""
    recon = net(codes, lists).float()  # (M, batch, d)
    if final:
        recon = recon[-1:]
    return (xb - recon).square().sum(-1).mean(-1).sum()


def gradient_passes(net: torch.nn.Module, optimizer: torch.optim.Optimizer, xc: torch.Tensor, codes: torch.Tensor,
                    lc, tc: TrainConfig, batch: int, gen: torch.Generator, autocast: bool) -> float:
    """`reuse` passes over the chunk's codes (the search dominates the cost); returns the last loss.
    tc.loss: the loss of this phase, "steps" or "final" (`train` resolves the others)."""
    if tc.loss not in ("steps", "final"):
        raise ValueError(f"gradient passes take the steps or final loss, got {tc.loss!r}")
    loss = torch.zeros(())
    for _ in range(tc.reuse):
        order = torch.randperm(len(xc), generator=gen).to(xc.device)
        for b0 in range(0, len(xc), batch):
            b = order[b0:b0 + batch]
            with torch.autocast(xc.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = qinco_loss(net, xc[b], codes[b], None if lc is None else lc[b], tc.loss == "final")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_value_(net.parameters(), tc.grad_clip)
            optimizer.step()
    return float(loss.detach())


def schedule_after_stale(state: TrainState, tc: TrainConfig) -> bool:
    """A validation without progress: the plateau schedule's cut, and whether the run has stalled
    (`stop_after` of them; the plateau schedule: stale at its smallest learning rate)."""
    state.since_best += 1
    if tc.stop_after and state.since_best >= tc.stop_after:
        return True
    if tc.schedule != "plateau":
        return False
    state.stale += 1
    if state.stale >= tc.patience and state.lr <= tc.min_lr:
        log("validation MSE stopped improving at the smallest learning rate: early stop")
        return True
    if state.stale >= tc.patience:
        state.lr, state.stale = max(state.lr / 10, tc.min_lr), 0
    return False


@torch.no_grad()
def reset_dead_codewords(model: Qinco, optimizer: torch.optim.Optimizer, usage: torch.Tensor, xc: torch.Tensor,
                         codes: torch.Tensor, lc, gen: torch.Generator) -> int:
    """QINCo2's dead-codeword reset: a base codeword that no code chose in an epoch becomes the
    step's residual x - x̂(m-1) of a random vector of the last chunk (the network's branch is a
    correction of the codeword).  Every process makes rank 0's choice.  Returns how many were reset."""
    recon = model(codes, lc)  # (M, n, d)
    before = torch.cat([model.start(lc, len(xc))[None], recon[:-1]])
    reset = 0
    for m, step in enumerate(model.steps):
        dead = torch.nonzero(usage[m] == 0).flatten()
        if not len(dead):
            continue
        pick = torch.randint(len(xc), (len(dead),), generator=gen).to(xc.device)
        step.codebook[dead] = (xc[pick] - before[m, pick]).to(step.codebook.dtype)
        distributed.broadcast_tensor(step.codebook.data)
        for moment in optimizer.state.get(step.codebook, {}).values():
            if torch.is_tensor(moment) and moment.shape == step.codebook.shape:
                moment[dead] = 0
        reset += len(dead)
    if reset:
        log(f"reset {reset} dead codewords")
    return reset


def summarize(model: Qinco, xv: torch.Tensor, lv, state: TrainState, quality_sample: int = 1000):
    rows = [("faiss RQ (beam 5)", state.rq_val_mse)]
    if state.lsq_val_mse == state.lsq_val_mse:
        rows.append(("faiss LSQ++ (its own encoder)", state.lsq_val_mse))
    rows += [(f"QINCo at initialisation ({state.init.upper()}), training encoder", state.init_val_mse),
            ("QINCo trained, training encoder", state.best_val_mse)]
    fast, quality = ENCODERS["fast"], ENCODERS["quality"]
    rows.append((f"QINCo trained, fast encoder (A={min(fast.A, model.cfg.K)}, B={fast.B})",
                 validation_mse(model, xv, lv, fast)))
    # The quality encoder is slow (wide beams): judge it on a sample; its ratio to RQ
    # (measured on the whole validation set) is then approximate.
    n = min(quality_sample, len(xv))
    if n < len(xv):
        log(f"(quality encoder judged on {n} of {len(xv)} validation vectors)")
    rows.append((f"QINCo trained, quality encoder (A={min(quality.A, model.cfg.K)}, B={quality.B})",
                 validation_mse(model, xv[:n], None if lv is None else lv[:n], quality)))
    log(f"\nvalidation MSE after {state.seconds / 60:.1f} min, {state.vectors_seen} vectors seen")
    for name, value in rows:
        ratio = value / state.rq_val_mse if state.rq_val_mse == state.rq_val_mse else math.nan
        log(f"  {name:<52} {value:10.5g}   {ratio:6.3f} x RQ")
