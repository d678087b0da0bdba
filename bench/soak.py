"""Soak test: a real `qinco serve` under mixed concurrent load for a bounded time (loopback only).

    python -m bench.soak --minutes 10 --clients 8

Starts `qinco serve --no-demo` on a temporary data directory (or --data-dir)
holding --model, creates the collection `soak` and a second collection `cycle`
that a separate thread deletes and recreates every few seconds. Each client owns
its own id range and runs a mix of upserts (new ids), payload updates (re-upsert
of one of its ids with a new payload), deletes, searches, point reads, and
upserts/searches on `cycle` (where 404 is expected while it is being recreated).
Every acknowledged write is tracked (id -> expected payload, or deleted); reads
of a client's own ids are checked on the fly (read-your-writes), and at the end
every acknowledged write is verified: present with the right payload, deleted
ids absent, and the count right.

Reports errors (every non-2xx but the expected 404s on `cycle`, and transport
errors), the server's RSS at start and end, and p50/p99 latency of searches and
upserts per minute. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "service" / "demo" / "glove-50-ivf-8B.safetensors"
RANGE = 10**9  # ids per client
DELETED = object()


def load_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """GloVe vectors when the model is 50-d and the data package is there, else Gaussian ones."""
    if d == 50:
        try:
            from service.demo import glove_words
            return glove_words(n)[1]
        except Exception as e:  # noqa: BLE001 - the data package is optional
            print(f"no GloVe vectors ({e}); using Gaussian vectors", file=sys.stderr)
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def start_server(data_dir: Path, port: int, env: dict, log_path: Path, timeout: float = 300) -> subprocess.Popen:
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--data-dir", str(data_dir),
                             "--port", str(port), "--no-demo"], cwd=ROOT, stdout=log, stderr=log,
                            env={**os.environ, **env})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout}s; see {log_path}")


def stop_server(proc: subprocess.Popen):
    """SIGTERM (a clean shutdown), then kill after 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Stats:
    def __init__(self, t0: float):
        self.t0 = t0
        self.lock = threading.Lock()
        self.latency: dict[tuple[int, str], list[float]] = defaultdict(list)
        self.ops: dict[str, int] = defaultdict(int)
        self.errors: list[str] = []
        self.error_kinds: dict[str, int] = defaultdict(int)
        self.expected_404 = 0

    def time(self, op: str, seconds: float):
        with self.lock:
            self.latency[(int((time.time() - self.t0) // 60), op)].append(seconds)
            self.ops[op] += 1

    def error(self, kind: str, detail: str):
        with self.lock:
            self.error_kinds[kind] += 1
            if len(self.errors) < 50:
                self.errors.append(f"{kind}: {detail[:400]}")


class Client(threading.Thread):
    def __init__(self, k: int, url: str, vectors: np.ndarray, words: list[str], stats: Stats, deadline: float,
                 batch: int):
        super().__init__(daemon=True, name=f"client-{k}")
        self.k, self.url, self.vectors, self.words, self.stats, self.deadline = k, url, vectors, words, stats, deadline
        self.batch = batch
        self.rng = random.Random(k)
        self.base = (k + 1) * RANGE
        self.next_id = self.base
        self.expected: dict[int, object] = {}   # id -> payload, or DELETED (acknowledged writes only)
        self.uncertain: set[int] = set()         # a write was sent but not acknowledged
        self.version = 0

    def payload(self, i: int) -> dict:
        self.version += 1
        return {"client": self.k, "v": self.version, "word": self.words[i % len(self.words)],
                "tags": [self.k, self.version % 7]}

    def request(self, client: httpx.Client, op: str, method: str, path: str, ok404: bool = False, **kw):
        t0 = time.perf_counter()
        try:
            r = client.request(method, path, **kw)
        except httpx.HTTPError as e:
            self.stats.error(f"{op}: {type(e).__name__}", f"{method} {path}: {e}")
            return None
        if op in ("search", "upsert"):
            self.stats.time(op, time.perf_counter() - t0)
        else:
            with self.stats.lock:
                self.stats.ops[op] += 1
        if r.status_code == 404 and ok404:
            with self.stats.lock:
                self.stats.expected_404 += 1
            return r
        if not 200 <= r.status_code < 300:
            body = json.dumps(kw.get("json"))[:200] if kw.get("json") is not None else ""
            self.stats.error(f"{op}: HTTP {r.status_code}", f"{method} {path} {body} -> {r.text[:300]}")
            return None
        return r

    def live_ids(self) -> list[int]:
        return [i for i, p in self.expected.items() if p is not DELETED]

    def upsert(self, client, ids: list[int], collection: str = "soak"):
        rows = [self.rng.randrange(len(self.vectors)) for _ in ids]
        payloads = [self.payload(r) for r in rows]
        points = [{"id": i, "vector": self.vectors[r].tolist(), "payload": p} for i, r, p in zip(ids, rows, payloads)]
        ok404 = collection == "cycle"
        if collection == "soak":
            self.uncertain.update(ids)
        r = self.request(client, "upsert" if collection == "soak" else "cycle upsert", "PUT",
                         f"/collections/{collection}/points", ok404=ok404, json={"points": points})
        if r is not None and r.status_code == 200 and collection == "soak":
            for i, p in zip(ids, payloads):
                self.expected[i] = p
                self.uncertain.discard(i)

    def run(self):
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while time.time() < self.deadline:
                roll = self.rng.random()
                live = self.live_ids()
                if roll < 0.30 or len(live) < 10:  # new points
                    n = self.rng.randint(1, self.batch)
                    ids = list(range(self.next_id, self.next_id + n))
                    self.next_id += n
                    self.upsert(client, ids)
                elif roll < 0.40:  # payload update of existing ids (and their vectors)
                    self.upsert(client, self.rng.sample(live, min(len(live), self.rng.randint(1, 4))))
                elif roll < 0.47:  # delete a few of its own ids (sometimes one never written)
                    ids = self.rng.sample(live, min(len(live), self.rng.randint(1, 4)))
                    if self.rng.random() < 0.2:
                        ids.append(self.next_id + 10**6)
                    self.uncertain.update(ids)
                    r = self.request(client, "delete", "POST", "/collections/soak/points/delete", json={"points": ids})
                    if r is not None:
                        for i in ids:
                            self.expected[i] = DELETED
                            self.uncertain.discard(i)
                elif roll < 0.82:  # search (checks own ids in the hits against the expected payloads)
                    q = self.vectors[self.rng.randrange(len(self.vectors))]
                    limit = self.rng.choice([1, 10, 10, 50])
                    r = self.request(client, "search", "POST", "/collections/soak/points/search",
                                     json={"vector": q.tolist(), "limit": limit, "with_payload": True})
                    if r is not None:
                        hits = r.json()["result"]
                        if len(hits) > limit:
                            self.stats.error("search: too many hits", f"{len(hits)} > {limit}")
                        for h in hits:
                            i = h["id"]
                            if self.base <= i < self.base + RANGE and i not in self.uncertain:
                                want = self.expected.get(i, DELETED)
                                if want is DELETED:
                                    self.stats.error("search: deleted id returned", f"id {i}")
                                elif h.get("payload") != want:
                                    self.stats.error("search: stale payload", f"id {i}: {h.get('payload')} != {want}")
                elif roll < 0.92:  # read one of its own ids back
                    if live:
                        i = self.rng.choice(live)
                        if i in self.uncertain:
                            continue
                        r = self.request(client, "get", "GET", f"/collections/soak/points/{i}")
                        if r is not None and r.json()["result"]["payload"] != self.expected[i]:
                            self.stats.error("get: stale payload", f"id {i}")
                else:  # the recycled collection: 404 is expected while it is deleted
                    if self.rng.random() < 0.5:
                        self.upsert(client, [self.base + self.rng.randrange(1000)], collection="cycle")
                    else:
                        q = self.vectors[self.rng.randrange(len(self.vectors))]
                        self.request(client, "cycle search", "POST", "/collections/cycle/points/search", ok404=True,
                                     json={"vector": q.tolist(), "limit": 5})


def cycler(url: str, model: str, stats: Stats, deadline: float, period: float):
    """Delete and recreate the collection `cycle` every `period` seconds."""
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.time() < deadline:
            time.sleep(period)
            for method, kw in (("DELETE", {}), ("PUT", {"json": {"model": model, "metric": "cosine"}})):
                try:
                    r = client.request(method, "/collections/cycle", **kw)
                except httpx.HTTPError as e:
                    stats.error(f"cycle {method}: {type(e).__name__}", str(e))
                    continue
                with stats.lock:
                    stats.ops[f"cycle {method.lower()}"] += 1
                if r.status_code != 200:
                    stats.error(f"cycle {method}: HTTP {r.status_code}", r.text[:300])


def percentiles(xs: list[float]) -> tuple[float, float]:
    return float(np.percentile(xs, 50) * 1000), float(np.percentile(xs, 99) * 1000)


def verify_client(url: str, c: Client, stats: Stats) -> dict:
    out = {"checked": 0, "lost": 0, "wrong_payload": 0, "deleted_but_present": 0}
    with httpx.Client(base_url=url, timeout=120) as client:
        for i, want in c.expected.items():
            if i in c.uncertain:
                continue
            out["checked"] += 1
            r = client.get(f"/collections/soak/points/{i}")
            if want is DELETED:
                if r.status_code != 404:
                    out["deleted_but_present"] += 1
                    stats.error("verify: deleted id present", f"id {i}: {r.status_code} {r.text[:200]}")
            elif r.status_code != 200:
                out["lost"] += 1
                stats.error("verify: acknowledged write lost", f"id {i}: {r.status_code} {r.text[:200]}")
            elif r.json()["result"]["payload"] != want:
                out["wrong_payload"] += 1
                stats.error("verify: wrong payload", f"id {i}: {r.json()['result']['payload']} != {want}")
    return out


def verify(url: str, clients: list[Client], stats: Stats) -> dict:
    """Every acknowledged write is there with its payload; every acknowledged delete is gone."""
    from concurrent.futures import ThreadPoolExecutor
    t0 = time.time()
    with ThreadPoolExecutor(len(clients)) as pool:
        parts = list(pool.map(lambda c: verify_client(url, c, stats), clients))
    result = {k: sum(p[k] for p in parts) for k in parts[0]} if parts else {}
    present = sum(1 for c in clients for i, p in c.expected.items() if p is not DELETED and i not in c.uncertain)
    uncertain = sum(len(c.uncertain) for c in clients)
    count = httpx.get(f"{url}/collections/soak/points/count", timeout=120).json()["result"]["count"]
    if not present <= count <= present + uncertain:
        stats.error("verify: count", f"count {count}, expected {present} (+ up to {uncertain} unacknowledged)")
    return {**result, "count": count, "expected_count": present, "unacknowledged": uncertain,
            "seconds": round(time.time() - t0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="an IVF model file (.safetensors)")
    ap.add_argument("--data-dir", type=Path, help="default: a temporary directory, removed afterwards")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("--batch", type=int, default=32, help="largest upsert batch")
    ap.add_argument("--cycle-every", type=float, default=5.0, help="seconds between delete/recreate of `cycle`")
    ap.add_argument("--snapshot-every", type=int, default=5000, help="QINCO_SNAPSHOT_EVERY for the server")
    ap.add_argument("--threads", type=int, default=0, help="QINCO_THREADS for the server")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)

    tmp = None
    data_dir = args.data_dir or Path(tmp := tempfile.mkdtemp(prefix="qinco-soak-"))
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(args.model, data_dir / "models" / "soak.safetensors")
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "server.log"
    env = {"QINCO_SNAPSHOT_EVERY": str(args.snapshot_every), "QINCO_THREADS": str(args.threads),
           "QINCO_API_KEY": ""}
    proc = start_server(data_dir, port, env, log_path)
    try:
        model = "models/soak.safetensors"
        for name, metric in (("soak", "cosine"), ("cycle", "cosine")):
            r = httpx.put(f"{url}/collections/{name}", json={"model": model, "metric": metric}, timeout=300)
            if r.status_code != 200:
                raise RuntimeError(f"cannot create {name}: {r.status_code} {r.text}")
        d = httpx.get(f"{url}/collections/soak").json()["result"]["dimension"]  # creation answers true, as Qdrant
        vectors = load_vectors(20_000, d)
        words = [f"w{i}" for i in range(len(vectors))]
        try:
            from service.demo import glove_words
            words = glove_words(len(vectors))[0] if d == 50 else words
        except Exception:  # noqa: BLE001
            pass
        rss = {"start_kib": rss_kib(proc.pid)}
        t0 = time.time()
        deadline = t0 + args.minutes * 60
        stats = Stats(t0)
        clients = [Client(k, url, vectors, words, stats, deadline, args.batch) for k in range(args.clients)]
        threads = clients + [threading.Thread(target=cycler, args=(url, model, stats, deadline, args.cycle_every),
                                              daemon=True)]
        for t in threads:
            t.start()
        rss_by_minute = []
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            if proc.poll() is not None:
                stats.error("server died", f"exit {proc.returncode}")
                break
            if len(rss_by_minute) < int((time.time() - t0) // 60):
                rss_by_minute.append(rss_kib(proc.pid))
            if time.time() > deadline + 300:
                stats.error("clients hung", "still running 5 minutes after the deadline")
                break
        load_seconds = time.time() - t0
        rss["end_kib"] = rss_kib(proc.pid)
        rss["by_minute_kib"] = rss_by_minute
        result = verify(url, clients, stats) if proc.poll() is None else {"skipped": "server died"}
        rss["after_verify_kib"] = rss_kib(proc.pid)
    finally:
        stop_server(proc)

    per_minute = {}
    for (minute, op), xs in sorted(stats.latency.items()):
        p50, p99 = percentiles(xs)
        per_minute.setdefault(minute, {})[op] = {"n": len(xs), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
    report = {"minutes": args.minutes, "clients": args.clients, "model": str(args.model), "seconds": round(load_seconds),
              "ops": dict(stats.ops), "expected_404_on_cycle": stats.expected_404,
              "errors": dict(stats.error_kinds), "error_samples": stats.errors, "rss": rss,
              "latency_per_minute": per_minute, "verify": result, "server_log": str(log_path) if not tmp else None}
    failed = bool(stats.error_kinds)
    print(f"soak: {args.clients} clients, {load_seconds:.0f}s, {sum(stats.ops.values())} requests: "
          + ", ".join(f"{k} {v}" for k, v in sorted(stats.ops.items())))
    print(f"expected 404s on the recycled collection: {stats.expected_404}")
    print(f"RSS: start {rss['start_kib'] / 1024:.0f} MiB, end {(rss['end_kib'] or 0) / 1024:.0f} MiB, "
          f"per minute {[round((x or 0) / 1024) for x in rss_by_minute]} MiB")
    print("minute  search n  p50 ms  p99 ms | upsert n  p50 ms  p99 ms")
    for minute, ops in per_minute.items():
        s, u = ops.get("search", {}), ops.get("upsert", {})
        print(f"{minute:6d}  {s.get('n', 0):8d}  {s.get('p50_ms', 0):6.1f}  {s.get('p99_ms', 0):6.1f} | "
              f"{u.get('n', 0):8d}  {u.get('p50_ms', 0):6.1f}  {u.get('p99_ms', 0):6.1f}")
    print(f"verify: {result}")
    print(f"errors: {dict(stats.error_kinds) or 'none'}")
    for e in stats.errors[:20]:
        print(f"  {e}")
    if failed and tmp:
        keep = Path(tempfile.gettempdir()) / f"qinco-soak-log-{os.getpid()}.txt"
        shutil.copy(log_path, keep)
        print(f"server log kept at {keep}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print("soak:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
