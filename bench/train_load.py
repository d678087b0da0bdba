"""Searches while two collections train: does background training starve them?

One server (`qinco serve --no-demo`, its defaults: each job a child process at nice 10 that
trains with QINCO_TRAIN_THREADS threads, half the cores, and encodes with QINCO_ENCODE_THREADS,
all of them). A collection created from the demo model holds `--nb` glove-50 words; one client sends it lone searches (default parameters) on one kept-alive
connection, first with nothing else running, then while two self-training collections (created
by shape, `--train-points` points each) train their models side by side. Reports p50/p95/p99 of
both phases and their ratio.

    python bench/train_load.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.load import lone_latency, percentiles  # noqa: E402
from bench.soak import free_port, start_server, stop_server  # noqa: E402
from model import datasets  # noqa: E402

MODEL = ROOT / "service" / "demo" / "glove-50-ivf-8B.safetensors"


def upload(http: httpx.Client, name: str, x: np.ndarray, batch: int = 1000):
    for i0 in range(0, len(x), batch):
        r = http.put(f"/collections/{name}/points", json={"batch": {"ids": list(range(i0, i0 + len(x[i0:i0 + batch]))),
                                                                    "vectors": x[i0:i0 + batch].tolist()}})
        r.raise_for_status()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nb", type=int, default=20_000, help="points of the searched collection")
    p.add_argument("--train-points", type=int, default=20_000, help="points of each training collection")
    p.add_argument("--train-minutes", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each search phase")
    args = p.parse_args()

    ds = datasets.load("glove-50")
    data_dir = Path(tempfile.mkdtemp(prefix="qinco-train-load-"))
    (data_dir / "models").mkdir()
    shutil.copy(MODEL, data_dir / "models" / "demo.safetensors")
    port = free_port()
    proc = start_server(data_dir, port, {}, data_dir / "server.log")
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        http.put("/collections/searched", json={"model": "models/demo.safetensors", "metric": "cosine"}).raise_for_status()
        upload(http, "searched", ds.base[:args.nb])
        while http.get("/collections/searched").json()["result"]["status"] != "green":  # refined
            time.sleep(0.5)
        bodies = [json.dumps({"vector": q.tolist(), "limit": 10}).encode() for q in ds.queries[:1000]]
        path = "/collections/searched/points/search"
        lone_latency(port, "POST", path, bodies, 2)  # warm-up
        idle = lone_latency(port, "POST", path, bodies, args.seconds)
        for k, name in enumerate(("train-a", "train-b")):
            http.put(f"/collections/{name}", json={
                "vectors": {"size": 50, "distance": "Cosine"},
                "qinco": {"train_after": args.train_points, "train_minutes": args.train_minutes}}).raise_for_status()
            upload(http, name, ds.learn[k * args.train_points:(k + 1) * args.train_points])
        deadline = time.time() + 120
        while not all(http.get(f"/collections/{n}").json()["result"]["qinco"]["phase"] == "training"
                      for n in ("train-a", "train-b")):
            if time.time() > deadline:
                raise SystemExit("the two collections did not start training")
            time.sleep(0.5)
        time.sleep(5)  # past the workers' start-up
        busy = lone_latency(port, "POST", path, bodies, args.seconds)
        phases = [http.get(f"/collections/{n}").json()["result"]["qinco"]["phase"] for n in ("train-a", "train-b")]
    finally:
        stop_server(proc)
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"lone search, {args.nb:,} glove-50 points, default parameters, one client on one connection")
    print(f"  idle:                      {len(idle):,} searches, {percentiles(idle)}")
    print(f"  two collections training: {len(busy):,} searches, {percentiles(busy)} (jobs still: {phases})")
    print(f"  p50 ratio busy / idle: {np.percentile(busy, 50) / np.percentile(idle, 50):.2f}, "
          f"p99: {np.percentile(busy, 99) / np.percentile(idle, 99):.2f}")


if __name__ == "__main__":
    main()
