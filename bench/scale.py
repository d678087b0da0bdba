"""The scale curve (issue #26): a real `qinco serve` loaded with N points over REST, measured.

For each N: a fresh data directory and server (`--no-demo`), one collection made from a model
file (its codes: the model's bytes + the norm byte), N points uploaded with qdrant-client's
`upload_collection` (batches of --batch, fast ingest on: acknowledged with `fast` codes, then
re-encoded in the background), then:

  * RSS (/proc/<pid>/status VmRSS, and apart its RssAnon and RssFile: pages of mapped files,
    which the kernel can reclaim) with the empty collection (after a warm-up collection of 2,000
    points was loaded, searched and deleted), once every point is acknowledged,
    once green (refinement done), and after a restart; per point = growth from the empty
    collection / N (this counts the fixed costs of a first load too: buffers, SQLite caches,
    thread pools), and the marginal bytes per point between two N (the slope, without them).
    Peak RSS (VmHWM) over the run: what a memory limit must allow; and the peaks of RssAnon and
    RssFile sampled from the upload's start to green, with the time each training phase was
    first seen.
  * disk per point (the data directory / N), acknowledged points/s, seconds to green, seconds
    from the restart's start until the collection answers a search;
  * lone REST search latency p50/p99 (sequential queries, the collection's defaults), and QPS
    with --clients concurrent clients.

Vectors: GloVe-50 (400k, normalised) with the demo model by default; past 400k, GloVe rows
with Gaussian noise (sigma 0.1 per coordinate, then normalised), so that generated points
fall where the model's lists are: a memory and speed run, not a recall claim.  `--extras`
loads the same points with UUID ids, or with a payload (a keyword and an integer field), with
or without payload indexes on both: run each beside `none` to see what it adds per point.

`--nprobe-sweep 16 32 64 ...` (GloVe data): latency and recall at each nprobe, for 300 held-out
queries (rows of GloVe's first 100k, in every base from 100k, with the generator's noise) against
their exact top 10 in the N points: to compare N at the same recall (issue #26 item 5), not a
recall claim (the points past 400k are generated).

`--data minilm`: the real 1M MiniLM set (bench/corpus.py, 384-d), into a collection created by
size and distance as a user makes one: it trains its own model (`--train-minutes`) on the points
as they arrive, keeps the originals on disk, and turns green by itself.  Added figures: search
latency during the upload, recall against the exact top 10 (10-R@10 and 1-R@10; without rescore,
with rescore at oversampling 1, 4 and 16, and at nprobe 32 with oversampling 16), and lone search
p50/p99 with the collection's files dropped from the page cache before each query (posix_fadvise
DONTNEED) against warm.

    python bench/scale.py --n 100000 1000000
    python bench/scale.py --n 10000000 --batch 2000
    python bench/scale.py --n 10000000 --model m-16384-lists.safetensors --nprobe-sweep 32 64 128 256
    python bench/scale.py --data minilm --n 969003
    python bench/scale.py --plot bench/results/scale-*.json     # the curve: bench/results/scale.png
    for e in none uuid payload indexed; do python bench/scale.py --n 1000000 --encoder fast --extras $e; done
"""

from __future__ import annotations

import argparse
import json
import os
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

from model.datasets import exact_knn  # noqa: E402
from bench.soak import DEFAULT_MODEL, free_port, load_vectors, percentiles, start_server, stop_server  # noqa: E402


def rss_split(pid: int, when: str) -> dict:
    """RSS in anonymous memory and in mapped file pages (page cache the kernel can reclaim), MiB."""
    return {f"rss_{kind}_mib_{when}": round((proc_status(pid, key) or 0) / 1024, 1)
            for kind, key in (("anon", "RssAnon"), ("file", "RssFile"))}


def proc_status(pid: int, key: str) -> int | None:
    """A /proc/<pid>/status figure in KiB (VmRSS, VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n unit vectors: GloVe's, then GloVe rows with noise past its 400k (see the docstring)."""
    real = load_vectors(min(n, 400_000), d)
    real = real / np.linalg.norm(real, axis=1, keepdims=True)
    if n <= len(real):
        return real[:n].astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    out[:len(real)] = real
    for i0 in range(len(real), n, 1_000_000):
        m = min(1_000_000, n - i0)
        x = real[rng.integers(0, len(real), m)] + 0.1 * rng.standard_normal((m, d)).astype(np.float32)
        out[i0:i0 + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def held_out_queries(n_queries: int = 300, seed: int = 1) -> np.ndarray:
    """GloVe rows of the first 100k (in the base of every N from 100k) with the generator's noise, normalised."""
    real = load_vectors(100_000, 50)
    rng = np.random.default_rng(seed)
    rows = real[rng.choice(len(real), n_queries, replace=False)]
    q = rows / np.linalg.norm(rows, axis=1, keepdims=True) + 0.1 * rng.standard_normal(rows.shape)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def warm_up(url: str, x: np.ndarray, body: dict):
    """Load, search and delete a small collection (created with `body`) first, so that the
    baseline RSS has what any first load brings (library pages, thread pools, buffers, the
    scan's compiled code), not only the empty server.  A self-training one trains a first model."""
    from qdrant_client import QdrantClient
    httpx.put(f"{url}/collections/warm", json=body, timeout=120).raise_for_status()
    client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False, timeout=300)
    client.upload_collection("warm", x, ids=range(len(x)), batch_size=500, wait=True)
    if "vectors" in body:
        httpx.post(f"{url}/collections/warm/train", json={"minutes": 0.2}, timeout=120).raise_for_status()
        time.sleep(1)
    wait_green(url, 600, "warm")
    latency(url, x[:50], "warm")
    httpx.delete(f"{url}/collections/warm", timeout=120).raise_for_status()


def wait_green(url: str, timeout: float, name: str = "c", done=("green",)) -> float:
    """Seconds until the collection's status is one of `done` (grey: collecting, no model yet)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = httpx.get(f"{url}/collections/{name}", timeout=30).json()["result"]
        if info["status"] in done:
            return time.time() - t0
        time.sleep(1)
    raise RuntimeError(f"not green after {timeout} s")


def wait_searchable(url: str, query: np.ndarray, name: str = "c"):
    """Until a search of the collection answers (a restarted server loads it first)."""
    while httpx.post(f"{url}/collections/{name}/points/query", json={"query": query.tolist(), "limit": 1},
                     timeout=60).status_code != 200:
        time.sleep(0.2)


def latency(url: str, queries: np.ndarray, name: str = "c", params: dict | None = None, before=None) -> dict:
    """Lone searches one after the other; `before()` runs ahead of each, untimed."""
    times = []
    with httpx.Client(timeout=60) as http:
        for q in queries:
            if before is not None:
                before()
            t0 = time.perf_counter()
            http.post(f"{url}/collections/{name}/points/query",
                      json={"query": q.tolist(), "limit": 10, "params": params or {}}).raise_for_status()
            times.append(time.perf_counter() - t0)
    p50, p99 = percentiles(times)  # milliseconds
    return {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}


def drop_page_cache(folder: Path):
    """Drop the clean pages of every file of a collection (its originals, its record) from the cache."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def recall(url: str, queries: np.ndarray, gt: np.ndarray, params: dict) -> dict:
    """10-recall@10 (the share of each query's exact top 10 among its 10 hits) and 1-recall@10
    (the share of queries whose exact nearest is among them); ids are base rows."""
    overlap = first = 0
    with httpx.Client(timeout=300) as http:
        for q0 in range(0, len(queries), 100):
            searches = [{"query": q.tolist(), "limit": 10, "params": params} for q in queries[q0:q0 + 100]]
            r = http.post(f"{url}/collections/c/points/query/batch", json={"searches": searches})
            r.raise_for_status()
            for hits, want in zip(r.json()["result"], gt[q0:q0 + 100]):
                found = {p["id"] for p in hits["points"]}
                overlap += len(found & set(want[:10].tolist()))
                first += int(want[0]) in found
    return {"10-R@10": round(overlap / (10 * len(queries)), 4), "1-R@10": round(first / len(queries), 4)}


class Poller:
    """A daemon thread that calls `poll(http)` every `every` seconds, from its start until `finish`
    (subclasses set their state before calling this __init__: the thread starts in it)."""

    def __init__(self, url: str, every: float):
        self.url, self.every, self.ticks, self.stop = url, every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        with httpx.Client(timeout=60) as http:
            while not self.stop.wait(self.every):
                self.poll(http)
                self.ticks += 1

    def poll(self, http: httpx.Client):
        raise NotImplementedError

    def finish(self):
        self.stop.set()
        self.thread.join()


class Watch(Poller):
    """From the upload's start until `result`: the largest RssAnon and RssFile (polled 5 times a
    second; VmHWM alone cannot tell the process's own memory from the mapped originals' page
    cache), and the seconds at which each training phase was first seen (polled each second)."""

    def __init__(self, pid: int, url: str):
        self.pid, self.t0, self.peak, self.phases = pid, time.time(), {"RssAnon": 0, "RssFile": 0}, {}
        super().__init__(url, 0.2)

    def poll(self, http: httpx.Client):
        for key in self.peak:
            self.peak[key] = max(self.peak[key], proc_status(self.pid, key) or 0)
        if self.ticks % 5:
            return
        try:
            q = http.get(f"{self.url}/collections/c").json()["result"].get("qinco") or {}
        except httpx.HTTPError:  # a slow answer under load: the next poll
            return
        phase = "/".join(p for p in (q.get("phase"), (q.get("job") or {}).get("phase")) if p)
        generation = (q.get("model") or {}).get("generation")
        if phase:  # a job that retrains a serving model (the collection outgrew it) apart from the first
            self.phases.setdefault(f"{phase}, generation {generation} serving" if generation else phase,
                                   round(time.time() - self.t0, 1))

    def result(self) -> dict:
        self.finish()
        return {"peak_rss_anon_mib": round(self.peak["RssAnon"] / 1024, 1),
                "peak_rss_file_mib": round(self.peak["RssFile"] / 1024, 1), "phases_s": self.phases}


class DuringLoad(Poller):
    """Lone searches every half second while a load runs: their latencies."""

    def __init__(self, url: str, queries: np.ndarray):
        self.queries, self.times = queries, []
        super().__init__(url, 0.5)

    def poll(self, http: httpx.Client):
        t0 = time.perf_counter()
        r = http.post(f"{self.url}/collections/c/points/query",
                      json={"query": self.queries[self.ticks % len(self.queries)].tolist(), "limit": 10})
        if r.status_code == 200:
            self.times.append(time.perf_counter() - t0)

    def result(self) -> dict:
        self.finish()
        if not self.times:
            return {}
        p50, p99 = percentiles(self.times)
        return {"during_load_p50_ms": round(p50, 2), "during_load_p99_ms": round(p99, 2),
                "during_load_searches": len(self.times)}


def qps(url: str, queries: np.ndarray, clients: int, seconds: float = 20) -> float:
    done, stop = [0] * clients, time.time() + seconds

    def run(k: int):
        with httpx.Client(timeout=60) as http:
            i = k
            while time.time() < stop:
                http.post(f"{url}/collections/c/points/query",
                          json={"query": queries[i % len(queries)].tolist(), "limit": 10}).raise_for_status()
                done[k] += 1
                i += clients
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(sum(done) / seconds, 1)


EXTRAS = ("none", "uuid", "payload", "indexed")
TAGS = ("news", "blog", "paper", "forum", "wiki", "code", "mail", "chat", "book", "misc")


def extras(kind: str, n: int):
    """The ids and payloads of an upload: integer ids and no payload ("none"); UUID ids
    ("uuid"); or a payload {"tag": one of 10 words, "n": an integer < 10^9}, with
    ("indexed") or without a payload index on both fields."""
    if kind == "uuid":
        import uuid
        rng = np.random.default_rng(2)
        return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)], None
    if kind in ("payload", "indexed"):
        rng = np.random.default_rng(3)
        tags, numbers = rng.integers(0, len(TAGS), n), rng.integers(0, 10**9, n)
        return range(n), ({"tag": TAGS[t], "n": int(v)} for t, v in zip(tags.tolist(), numbers.tolist()))
    return range(n), None


def run_one(n: int, args, model: Path, work: Path) -> dict:
    from qdrant_client import QdrantClient
    data = work / f"n{n}"
    shutil.rmtree(data, ignore_errors=True)
    (data / "models").mkdir(parents=True)
    shutil.copy(model, data / "models" / "m.safetensors")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"QINCO_SNAPSHOT_EVERY": str(args.snapshot_every)}
    proc = start_server(data, port, env, work / f"n{n}.log")
    out: dict = {"n": n, "data": args.data, **({"extras": args.extras} if args.extras != "none" else {})}
    try:
        if args.data == "minilm":
            from bench.corpus import load
            corpus = load()
            x, queries, gt = corpus["base"][:n], corpus["queries"][:args.queries], corpus["gt"][:args.queries]
            if n < len(corpus["base"]):  # the corpus's ground truth is over the whole base: the exact top 10 of x
                gt = np.stack([np.argsort(-(x @ q))[:10] for q in queries])
            del corpus
            body = {"vectors": {"size": x.shape[1], "distance": "Cosine"}, "encoder": args.encoder,
                    "qinco": {"train_minutes": args.train_minutes}}
            warm_up(url, x[:2000], {**body, "qinco": {"train_after": 0}})
        else:
            x = vectors(n, 50)
            queries, gt = x[np.random.default_rng(1).choice(n, 300, replace=False)], None
            if args.nprobe_sweep:
                held_out = held_out_queries()
                held_out_gt = exact_knn(x, held_out, 10)  # unit vectors: the L2 order is the cosine order
            body = {"model": "models/m.safetensors", "metric": "cosine", "encoder": args.encoder}
            warm_up(url, x[:2000], {"model": "models/m.safetensors", "metric": "cosine"})
        httpx.put(f"{url}/collections/c", json=body, timeout=120).raise_for_status()
        if args.extras == "indexed":  # declared before the upload: kept up to date by every write
            for field, schema in (("tag", "keyword"), ("n", "integer")):
                httpx.put(f"{url}/collections/c/index", json={"field_name": field, "field_schema": schema},
                          timeout=120).raise_for_status()
        time.sleep(2)
        empty = proc_status(proc.pid, "VmRSS")
        out.update(rss_split(proc.pid, "empty"))
        client = QdrantClient(url=url, prefer_grpc=False, check_compatibility=False, timeout=300)
        during, watch = DuringLoad(url, queries), Watch(proc.pid, url)
        t0 = time.time()
        ids, payload = extras(args.extras, n)
        client.upload_collection("c", x, ids=ids, payload=payload, batch_size=args.batch, parallel=1, wait=True)
        load_s = time.time() - t0
        out.update(during.result())
        acked = proc_status(proc.pid, "VmRSS")
        out.update(rss_split(proc.pid, "acked"))
        green_s = wait_green(url, args.green_timeout)
        time.sleep(5)  # a snapshot started by the last writes
        out.update(watch.result())
        green = proc_status(proc.pid, "VmRSS")
        out.update(rss_split(proc.pid, "green"))
        lone = latency(url, queries[:300])
        out.update(load_points_per_s=round(n / load_s), green_s=round(load_s + green_s, 1),
                   rss_empty_mib=round(empty / 1024, 1), rss_per_point_acked=round((acked - empty) * 1024 / n, 1),
                   rss_per_point_green=round((green - empty) * 1024 / n, 1),
                   peak_rss_mib=round(proc_status(proc.pid, "VmHWM") / 1024, 1), **lone,
                   qps=qps(url, queries[:300], args.clients))
        del x
        if args.data == "glove" and args.nprobe_sweep:
            out["nprobe_sweep"] = {str(p): {**recall(url, held_out, held_out_gt, {"nprobe": p}),
                                            **latency(url, held_out, params={"nprobe": p})}
                                   for p in args.nprobe_sweep}
        if gt is not None:
            rescore = {"quantization": {"rescore": True}}  # at the defaults: nprobe 2 sqrt(nlist), 128 candidates
            wide = {"nprobe": 64, "quantization": {"rescore": True, "oversampling": 16}}
            out["recall"] = {"no_rescore": recall(url, queries, gt, {}), "rescore": recall(url, queries, gt, rescore),
                             "rescore_nshort_20": recall(url, queries, gt, {**rescore, "nshort": 20}),
                             "nprobe_16_rescore": recall(url, queries, gt, {**rescore, "nprobe": 16}),
                             "nprobe_64_rescore_oversampling_16": recall(url, queries, gt, wide)}
            folder = data / "collections" / "c"
            cold = lambda: drop_page_cache(folder)  # noqa: E731
            out["rescore_latency"] = {"warm": latency(url, queries[:200]),
                                      "warm_rescore": latency(url, queries[:200], params=rescore),
                                      "warm_nprobe_64_rescore_16": latency(url, queries[:200], params=wide),
                                      "cold": latency(url, queries[:200], before=cold),
                                      "cold_rescore": latency(url, queries[:200], params=rescore, before=cold),
                                      "cold_nprobe_64_rescore_16": latency(url, queries[:200], params=wide, before=cold)}
    finally:
        stop_server(proc)
    out["disk_per_point"] = round(sum(f.stat().st_size for f in (data / "collections").rglob("*") if f.is_file()) / n, 1)
    t0 = time.time()
    proc = start_server(data, port, env, work / f"n{n}.log")
    try:
        wait_searchable(url, queries[0])
        out["restart_s"] = round(time.time() - t0, 1)
        time.sleep(2)
        out["rss_per_point_restart"] = round((proc_status(proc.pid, "VmRSS") - empty) * 1024 / n, 1)
        out.update(rss_split(proc.pid, "restart"))
    finally:
        stop_server(proc)
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
    return out


PANELS = [  # (title, [(label, key)], unit)
    ("RSS per point", [("green", "rss_per_point_green"), ("after restart", "rss_per_point_restart")], "bytes"),
    ("disk per point", [("", "disk_per_point")], "bytes"),
    ("load rate", [("", "load_points_per_s")], "points/s"),
    ("upload start to green", [("", "green_s")], "s"),
    ("restart to first search", [("", "restart_s")], "s"),
    ("lone search", [("p50", "p50_ms"), ("p99", "p99_ms")], "ms"),
    ("QPS, 8 clients", [("", "qps")], "queries/s"),
    ("recall (real data)", [("10-R@10", "recall.no_rescore.10-R@10"),
                            ("10-R@10, rescore", "recall.rescore.10-R@10"),
                            ("1-R@10", "recall.no_rescore.1-R@10")], ""),
]


def plot(files: list[Path], out: Path):
    """The scale curve: each panel of PANELS against N, one line per data set (rows of the files)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for f in files for r in json.loads(f.read_text())]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (title, series, unit) in zip(axes.ravel(), PANELS):
        for data in sorted({r.get("data", "glove") for r in rows}):
            mine = sorted((r for r in rows if r.get("data", "glove") == data), key=lambda r: r["n"])
            for label, key in series:
                # an RSS growth below zero: the restarted process's baseline is lower than the first's
                points = [(r["n"], value) for r in mine if (value := lookup(r, key)) is not None
                          and not (unit == "bytes" and value < 0)]
                if points:
                    ax.plot(*zip(*points), marker="o", label=f"{data} {label}".strip())
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("points")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("bench/scale.py: one qinco serve on 2 cores (glove: 8-byte codes, encoder fast, 100k on the demo "
                 "model's 1,024 lists, 1M-10M on 16,384; minilm: a self-training collection, 8-byte codes)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def lookup(row: dict, key: str):
    for part in key.split("."):
        if not isinstance(row, dict) or part not in row:
            return None
        row = row[part]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--encoder", default="balanced", help="the collection's encoder (fast: no background "
                                                         "re-encoding, green once acknowledged)")
    p.add_argument("--data", choices=("glove", "minilm"), default="glove")
    p.add_argument("--train-minutes", type=float, default=30.0, help="minilm: the collection's training budget")
    p.add_argument("--queries", type=int, default=1000, help="minilm: queries for recall")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--nprobe-sweep", type=int, nargs="*", default=[],
                   help="glove: recall and latency at each nprobe, for held-out queries")
    p.add_argument("--extras", choices=EXTRAS, default="none",
                   help="UUID ids, or payloads with or without payload indexes (what each adds per point)")
    p.add_argument("--snapshot-every", type=int, default=50_000)
    p.add_argument("--green-timeout", type=float, default=4 * 3600)
    p.add_argument("--work", type=Path, default=None, help="where data directories go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep each data directory")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    p.add_argument("--plot", type=Path, nargs="+", default=None,
                   help="only plot these result files (JSON rows) into --plot-out")
    p.add_argument("--plot-out", type=Path, default=ROOT / "bench" / "results" / "scale.png")
    args = p.parse_args()
    if args.nprobe_sweep and (args.data != "glove" or args.extras == "uuid"):
        p.error("--nprobe-sweep needs GloVe data with integer ids (recall compares ids with base rows)")
    if args.nprobe_sweep and not args.plot:
        from model.io import load_model
        nlist = load_model(args.model).cfg.nlist
        if max(args.nprobe_sweep) > nlist or min(args.nprobe_sweep) < 1:
            p.error(f"--nprobe-sweep values must be in [1, {nlist}]: the model's lists")
    if args.plot:
        return plot(args.plot, args.plot_out)
    work = args.work or Path(tempfile.mkdtemp(prefix="qinco-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.n:
        rows.append(run_one(n, args, args.model, work))
        if len(rows) > 1:  # the slope between this N and the last: growth per added point
            a, b = rows[-2], rows[-1]
            for when in ("green", "restart"):
                key = f"rss_per_point_{when}"
                b[f"marginal_{when}"] = round((b[key] * b["n"] - a[key] * a["n"]) / (b["n"] - a["n"]), 1)
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
