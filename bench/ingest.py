"""REST ingest with fast ingest on and off, in one run on the same model and base.

For each setting a fresh `qinco serve --no-demo` (QINCO_FAST_INGEST=true or false) gets a
collection created from the model file (its encoder: `balanced`, the default), and `--clients`
HTTP clients upload the base in batches of `--batch` points (bodies serialised beforehand).
Reported:
  * acknowledged points/s: base size / upload wall time (what a user waits for);
  * with fast ingest, the seconds after the upload until the background refinement has
    re-encoded every point (`qinco.refine_pending` reaches 0), and points/s over both;
  * the MSE of the stored codes against the (normalised) base: the server is stopped and its
    SQLite codes are decoded in-process, so every point counts; with the MSE of `fast` codes on
    a sample of the base, for what a point holds until it is refined.

    python bench/ingest.py --dataset glove-50 --model service/demo/glove-50-ivf-8B.safetensors
    python bench/ingest.py --dataset wordnet-minilm-384 --model runs/wordnet-ivf-8B.safetensors
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.soak import free_port, start_server, stop_server  # noqa: E402
from model import datasets  # noqa: E402
from model.io import load_model  # noqa: E402
from model.network import ENCODERS, decode, encode  # noqa: E402
from service.engine.registry import Store  # noqa: E402

COLLECTION = "ingest"
METRIC = {"angular": "cosine", "l2": "l2"}


def bodies(x: np.ndarray, batch: int) -> list[bytes]:
    return [json.dumps({"batch": {"ids": list(range(i0, i0 + len(x[i0:i0 + batch]))),
                                  "vectors": x[i0:i0 + batch].tolist()}}).encode()
            for i0 in range(0, len(x), batch)]


def upload(url: str, payloads: list[bytes], clients: int) -> float:
    """Seconds to upload every body, `clients` at a time."""
    errors = []

    def client(mine):
        with httpx.Client(base_url=url, timeout=600, headers={"content-type": "application/json"}) as http:
            for body in mine:
                r = http.put(f"/collections/{COLLECTION}/points?wait=true", content=body)
                if r.status_code != 200:
                    errors.append(r.text)
                    return

    threads = [threading.Thread(target=client, args=(payloads[c::clients],)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"upload failed: {errors[0][:500]}")
    return time.perf_counter() - t0


def wait_refined(url: str, timeout: float = 7200) -> float:
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as http:
        while http.get(f"/collections/{COLLECTION}").json()["result"]["qinco"]["refine_pending"]:
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError("the refinement did not finish")
            time.sleep(0.5)
    return time.perf_counter() - t0


def stored_mse(data_dir: Path, x: np.ndarray) -> float:
    """MSE of every stored point's decoded codes against its (prepared) vector."""
    store = Store(data_dir, fast_ingest=False)
    try:
        store.open_all()
        c = store.get(COLLECTION)
        space = c.space
        ids, codes = space.index.stored_codes()
        assert len(ids) == len(x), f"{len(ids)} points stored, {len(x)} uploaded"
        xhat = decode(space.model, codes)
        return float(((space.prepare(x[ids]) - xhat) ** 2).sum(1).mean())
    finally:
        store.close()


def run(setting: bool, args, x: np.ndarray, payloads: list[bytes], metric: str) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="qinco-ingest-"))
    try:
        (data_dir / "models").mkdir()
        shutil.copy(args.model, data_dir / "models" / "model.safetensors")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(data_dir, port, {"QINCO_FAST_INGEST": str(setting).lower()}, data_dir / "server.log")
        try:
            r = httpx.put(f"{url}/collections/{COLLECTION}", json={"model": "models/model.safetensors",
                                                                  "metric": metric}, timeout=600)
            r.raise_for_status()
            upload_s = upload(url, payloads, args.clients)
            refine_s = wait_refined(url) if setting else 0.0
        finally:
            stop_server(proc)
        mse = stored_mse(data_dir, x)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    n = len(x)
    return {"fast_ingest": setting, "points": n, "upload_s": round(upload_s, 1),
            "acked_per_s": round(n / upload_s), "refine_after_upload_s": round(refine_s, 1),
            "all_refined_per_s": round(n / (upload_s + refine_s)), "mse": mse}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="glove-50", choices=datasets.NAMES)
    p.add_argument("--model", type=Path, required=True, help="an IVF QINCo model file")
    p.add_argument("--nb", type=int, help="the first N base vectors (default: all)")
    p.add_argument("--batch", type=int, default=1000, help="points per upsert request")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--sample", type=int, default=10_000, help="base vectors for the MSE of fast codes")
    p.add_argument("--settings", choices=["both", "on"], default="both",
                   help="fast ingest off then on (default), or on only (off is the baseline of the ratio)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()

    ds = datasets.load(args.dataset)
    x = np.ascontiguousarray(ds.base[:args.nb] if args.nb else ds.base, dtype=np.float32)
    metric = METRIC[ds.metric]
    payloads = bodies(x, args.batch)
    model = load_model(args.model)
    print(f"{args.dataset}: {len(x):,} base vectors (d={x.shape[1]}), model {args.model} "
          f"(M={model.cfg.M}, nlist={model.cfg.nlist}), {args.clients} clients x {args.batch} points a request",
          flush=True)
    sample = x[np.random.default_rng(0).choice(len(x), min(args.sample, len(x)), replace=False)]
    if metric == "cosine":
        sample = sample / np.linalg.norm(sample, axis=1, keepdims=True)
    fast_mse = float(((sample - decode(model, encode(model, sample, ENCODERS["fast"]))) ** 2).sum(1).mean())
    rows = ([run(False, args, x, payloads, metric)] if args.settings == "both" else []) + [run(True, args, x, payloads, metric)]
    base = rows[0]
    print("\n| fast ingest | acknowledged points/s | upload s | refinement after it s | all refined, points/s "
          "| stored MSE (x off) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        vs_off = f" ({r['mse'] / base['mse']:.4f})" if len(rows) == 2 else ""
        print(f"| {'on' if r['fast_ingest'] else 'off'} | {r['acked_per_s']:,} | {r['upload_s']} "
              f"| {r['refine_after_upload_s']} | {r['all_refined_per_s']:,} | {r['mse']:.5g}{vs_off} |")
    if len(rows) == 2:
        print(f"\nacknowledged points/s, on / off: {rows[1]['acked_per_s'] / base['acked_per_s']:.2f}x")
    print(f"MSE of `fast` codes on {len(sample):,} base vectors (what a point holds until refined): {fast_mse:.5g}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"ingest-{args.dataset}{'' if args.settings == 'both' else '-on'}.json"
    out.write_text(json.dumps({"dataset": args.dataset, "model": str(args.model), "clients": args.clients,
                               "batch": args.batch, "rows": rows, "fast_mse_sample": fast_mse}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
