"""Load benchmark: concurrent HTTP clients on loopback against the same calls in-process.

Starts `qinco serve` on a fresh data directory, creates a collection from an IVF
model, and loads it with real vectors (timed: that is the insert duration).
Then, each phase bounded in time:
  - /healthz and search from a single client (the latency of a lone request), with httpx and
    with a lean client (one http.client connection, bodies serialised beforehand, as curl or a
    load generator would send them): the difference is the client's own Python;
  - search: C concurrent clients send single-query searches (with the server's micro-batching,
    and again after a restart without it);
  - upsert: C concurrent clients send batches of points;
and the same searches and upserts called in-process on the same index (no HTTP; upserts
encode without a lock and insert under one, as the store does, without its SQLite commit).
Reports QPS and p50/p95/p99 latency for each, and the REST/in-process ratio.

    python bench/load.py --dataset glove-50 --model runs/glove-50-ivf-8B.safetensors
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from model import datasets
from model.index import QincoIndex, SearchParams
from model.io import load_model


def percentiles(lat: list[float]) -> str:
    a = np.array(lat) * 1000
    return f"p50 {np.percentile(a, 50):.2f} ms, p95 {np.percentile(a, 95):.2f} ms, p99 {np.percentile(a, 99):.2f} ms"


def run_clients(n_clients: int, seconds: float, make_request) -> tuple[int, list[float], float]:
    """Each client c sends make_request(client, c + i * n_clients), i = 0, 1, ..., until the time is
    up, on its own httpx connection; returns (requests, latencies, wall seconds)."""
    clients = [httpx.Client(timeout=30) for _ in range(n_clients)]

    def call(c, i):
        r = make_request(clients[c], c + i * n_clients)
        if r.status_code != 200:
            raise RuntimeError(r.text)

    try:
        latencies, wall = run_local(n_clients, seconds, call)
    finally:
        for client in clients:
            client.close()
    return len(latencies), latencies, wall


def run_local(n_threads: int, seconds: float, call) -> tuple[list[float], float]:
    """Each thread c calls call(c, i), i = 0, 1, ..., until the time is up; returns
    (latencies, wall seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def loop(c):
        local, i = [], 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            call(c, i)
            local.append(time.perf_counter() - t0)
            i += 1
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0


def lone_latency(port: int, method: str, path: str, bodies: list[bytes | None], seconds: float) -> list[float]:
    """Latencies of one client on one kept-alive http.client connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port)

    def call(c, i):
        conn.request(method, path, body=bodies[i % len(bodies)], headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(data)

    try:
        return run_local(1, seconds, call)[0]
    finally:
        conn.close()


def start_server(data_dir: Path, port: int, batching: bool = True) -> subprocess.Popen:
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "QINCO_SEARCH_BATCHING": "true" if batching else "false"}
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--data-dir", str(data_dir),
                               "--port", str(port), "--no-demo"], stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.time() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit("server did not start")
        time.sleep(0.2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="glove-50", choices=datasets.NAMES)
    p.add_argument("--model", required=True, help="IVF model trained on this set")
    p.add_argument("--nb", type=int, default=50_000, help="points loaded before the phases")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--batch", type=int, default=100, help="points per upsert request")
    args = p.parse_args()

    ds = datasets.load(args.dataset)
    base, queries = ds.base[:args.nb], ds.queries
    data_dir = Path(tempfile.mkdtemp(prefix="qinco-load-"))
    (data_dir / "models").mkdir()
    shutil.copy(args.model, data_dir / "models" / "m.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = start_server(data_dir, port)
    try:
        httpx.put(f"{url}/collections/bench", json={"model": "models/m.safetensors"}).raise_for_status()

        t0 = time.perf_counter()
        with httpx.Client(timeout=300) as client:
            for i0 in range(0, len(base), 1000):
                pts = [{"id": i0 + k, "vector": v.tolist()} for k, v in enumerate(base[i0:i0 + 1000])]
                client.put(f"{url}/collections/bench/points", json={"points": pts}).raise_for_status()
        load_s = time.perf_counter() - t0
        print(f"{args.dataset}: loaded {len(base):,} points over HTTP in {load_s:.1f}s "
              f"({len(base) / load_s:,.0f} points/s), {args.clients} clients, {args.seconds:.0f}s per phase")

        params = SearchParams.defaults(httpx.get(f"{url}/collections/bench").json()["result"]["nlist"])  # the server's

        def healthz(client, i):
            return client.get(f"{url}/healthz")

        n, lat, wall = run_clients(1, min(args.seconds, 5), healthz)
        print(f"REST /healthz, 1 client:  {n / wall:8,.0f} QPS   {percentiles(lat)}")

        def search(client, i):
            body = {"vector": queries[i % len(queries)].tolist(), "limit": 10,
                    "params": {"nprobe": params.nprobe, "ef_search": params.ef_search, "nshort": params.nshort}}
            return client.post(f"{url}/collections/bench/points/search", json=body)

        n, lat, wall = run_clients(1, args.seconds, search)
        print(f"REST search, 1 client:    {n / wall:8,.0f} QPS   {percentiles(lat)}")
        lat = lone_latency(port, "GET", "/healthz", [None], min(args.seconds, 5))
        print(f"REST /healthz, 1 lean client: {len(lat) / min(args.seconds, 5):8,.0f} QPS   {percentiles(lat)}")
        bodies = [json.dumps({"vector": q.tolist(), "limit": 10, "params": {
            "nprobe": params.nprobe, "ef_search": params.ef_search, "nshort": params.nshort}}).encode() for q in queries[:1000]]
        lat = lone_latency(port, "POST", "/collections/bench/points/search", bodies, args.seconds)
        print(f"REST search, 1 lean client:   {len(lat) / args.seconds:8,.0f} QPS   {percentiles(lat)}")
        n, lat, wall = run_clients(args.clients, args.seconds, search)
        rest_qps = n / wall
        print(f"REST search, {args.clients} clients:   {rest_qps:8,.0f} QPS   {percentiles(lat)}")

        # The same concurrent searches with micro-batching off (a restart on the same data).
        server.kill()
        server.wait()
        server = start_server(data_dir, port, batching=False)
        n, lat, wall = run_clients(args.clients, args.seconds, search)
        print(f"REST search, {args.clients} clients, no micro-batching: {n / wall:8,.0f} QPS   {percentiles(lat)}")

        def upsert(client, i):
            ids = range(10**7 + i * args.batch, 10**7 + (i + 1) * args.batch)
            rows = np.arange(i * args.batch, (i + 1) * args.batch) % len(base)
            pts = [{"id": j, "vector": base[r].tolist()} for j, r in zip(ids, rows)]
            return client.put(f"{url}/collections/bench/points", json={"points": pts})

        n, lat, wall = run_clients(args.clients, args.seconds, upsert)
        rest_points = n * args.batch / wall
        print(f"REST upsert:       {n / wall:8,.0f} requests/s ({rest_points:,.0f} points/s)   "
              f"{percentiles(lat)}")
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(data_dir, ignore_errors=True)

    # The same searches in-process: same model, same points, same parameters, same thread count.
    index = QincoIndex(load_model(args.model))
    for i0 in range(0, len(base), 4096):
        index.add(base[i0:i0 + 4096], np.arange(i0, i0 + len(base[i0:i0 + 4096])))
    lone, wall = run_local(1, args.seconds, lambda c, i: index.search(queries[i % len(queries)][None], 10, params))
    print(f"in-process search, 1 thread: {len(lone) / wall:8,.0f} QPS   {percentiles(lone)}")

    def search_local(c, i):
        index.search(queries[(c + i * args.clients) % len(queries)][None], 10, params)

    lat, wall = run_local(args.clients, args.seconds, search_local)
    local_qps = len(lat) / wall
    print(f"in-process search, {args.clients} threads: {local_qps:8,.0f} QPS   {percentiles(lat)}")
    print(f"REST / in-process search throughput: {rest_qps / local_qps:.2f}")

    # The same upserts in-process, in the store's order: encode without a lock, insert under one.
    insert_lock, batches = threading.Lock(), itertools.count()

    def upsert_local(c, i):
        b = next(batches)
        codes = index.encode(base[np.arange(b * args.batch, (b + 1) * args.batch) % len(base)])
        with insert_lock:
            index.add_codes(codes, 10**7 + b * args.batch + np.arange(args.batch))

    lat, wall = run_local(args.clients, args.seconds, upsert_local)
    local_points = len(lat) * args.batch / wall
    print(f"in-process upsert, {args.clients} threads: {local_points:8,.0f} points/s   {percentiles(lat)}")
    print(f"REST / in-process upsert throughput: {rest_points / local_points:.2f}")


if __name__ == "__main__":
    main()
