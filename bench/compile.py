"""torch.compile on CPU for the encoder's network evaluations (issue #11 §1), against eager.

Each step's `FastStep.candidates` (the per-candidate network: table look-up, blocks, output
projection) is replaced by its `torch.compile`d version (inductor, C++ on CPU); the same
vectors are encoded with the same encoder, eager and compiled, interleaved, in the calling
thread.  Reported: compile time (the first call), vectors/s, and whether the codes agree.

    python bench/compile.py                                    # the demo model (glove-50, IVF)
    python bench/compile.py --model runs/wordnet-8B-de128-s10.safetensors --dataset wordnet-minilm-384
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model import datasets  # noqa: E402
from model.io import load_model  # noqa: E402
from model.network import ENCODERS, fast_steps  # noqa: E402
from model.threads import set_threads  # noqa: E402

DEMO_MODEL = ROOT / "service" / "demo" / "glove-50-ivf-8B.safetensors"


def encode_once(model, xn, lists, encoder) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    codes, _ = model.encode_normalized(xn, encoder, lists)
    return codes, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=datasets.NAMES, default="glove-50")
    p.add_argument("--model", type=Path, default=DEMO_MODEL)
    p.add_argument("--encoder", default="fast")
    p.add_argument("--nb", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    set_threads(args.threads)
    model = load_model(args.model)
    x = np.ascontiguousarray(datasets.load(args.dataset).base[:args.nb], dtype=np.float32)
    if datasets.load(args.dataset).metric == "angular":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    xn = model.normalize(torch.from_numpy(x))
    lists = model.assign(xn) if model.cfg.nlist else None
    encoder = ENCODERS[args.encoder]
    assert fast_steps(model) is fast_steps(model), "the model's FastSteps is not cached: patching it would not apply"
    steps = fast_steps(model).steps
    eager = [s.candidates for s in steps]
    compiled = [torch.compile(s.candidates, dynamic=True) for s in steps]

    def use(fns):
        for s, f in zip(steps, fns):
            s.candidates = f

    use(eager)
    ref, _ = encode_once(model, xn, lists, encoder)  # warm
    use(compiled)
    t0 = time.perf_counter()
    out, _ = encode_once(model, xn, lists, encoder)  # compiles (each step, each shape family)
    compile_s = time.perf_counter() - t0
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeat):
        for name, fns in (("eager", eager), ("compiled", compiled)):
            use(fns)
            codes, dt = encode_once(model, xn, lists, encoder)
            times[name].append(dt)
            if name == "compiled":
                out = codes
    use(eager)
    agree = float((out == ref).all(1).float().mean())
    print(f"{args.dataset}, {args.model.name} ({model.cfg}), encoder {args.encoder}, {args.nb} vectors, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"first compiled call (compilation included): {compile_s:.1f} s")
    print("| path | best vec/s | median vec/s |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {args.nb / min(ts):,.0f} | {args.nb / float(np.median(ts)):,.0f} |")
    print(f"compiled / eager (best): {min(times['eager']) / min(times['compiled']):.2f}x; "
          f"identical codes: {agree:.2%} of vectors")


if __name__ == "__main__":
    main()
