"""Self-training collection: create by shape, upload, let the server train its own QINCo model.

Starts `qinco serve --no-demo` on a fresh data directory and creates the collection by
shape only ({"vectors": {"size": d, "distance": ...}, "qinco": {...}}: no model file).
Then, over HTTP, one client:
  1. uploads the first train_after - 1 base vectors in batches (upload throughput while
     collecting), and measures recall@1/@10 and single-client QPS of the exact search the
     collection serves before it has a model (default parameters, then "rescore": true),
     against exact ground truth over the uploaded prefix;
  2. uploads point train_after - 1: the collection now holds train_after points and starts
     training by itself (the clock starts here);
  3. uploads the rest of the base while the job runs (upload throughput while training,
     and while encoding if the upload outlasts training), while a second thread polls
     GET /collections/{name} (qinco.phase, qinco.job, qinco.model) and notes when training
     started, when encoding began (the model is trained) and when the swap happened
     (qinco.model.generation 1, phase "ready");
  4. once the collection is ready (and every point is served by the QINCo index), measures
     recall@1/@10 and QPS at the default search parameters, with and without
     "params": {"rescore": true}, against exact ground truth over the whole uploaded base.
Recall as the paper reports it: R@k = fraction of queries whose true nearest neighbour
(faiss IndexFlatL2 over the uploaded vectors; angular sets are unit-norm) is among the first k.
Prints markdown tables and writes every figure to bench/results/selftrain-<dataset>.json.

    python bench/selftrain.py                                  # wordnet-minilm-384, server's budget
    python bench/selftrain.py --train-minutes 2 --limit-base 30000 --train-after 10000   # quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (python bench/selftrain.py): make `bench` importable
    sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.soak import free_port, percentiles, rss_kib, start_server, stop_server  # noqa: E402
from model import datasets  # noqa: E402

COLLECTION = "selftrain"
DISTANCE = {"angular": "Cosine", "l2": "Euclid"}


class Api:
    """The few calls the benchmark makes; a non-2xx answer raises with the server's message."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=600)
        self.path = f"/collections/{COLLECTION}"

    def call(self, method: str, path: str, **kw):
        r = self.http.request(method, self.path + path, **kw)
        if not 200 <= r.status_code < 300:
            raise RuntimeError(f"{method} {self.path + path}: HTTP {r.status_code}: {r.text[:1000]}")
        return r.json()["result"]

    def upsert(self, vectors: np.ndarray, first_id: int) -> float:
        """One batch; returns the seconds of the request alone (the JSON body is built before)."""
        body = json.dumps({"points": [{"id": first_id + k, "vector": v} for k, v in enumerate(vectors.tolist())]})
        t0 = time.perf_counter()
        self.call("PUT", "/points", content=body, headers={"content-type": "application/json"})
        return time.perf_counter() - t0

    def info(self) -> dict:
        return self.call("GET", "")


class Watcher(threading.Thread):
    """Polls the collection info; notes the first time each phase (of the collection and of
    its job) is seen, and keeps a light timeline of the job's progress."""

    def __init__(self, url: str, every: float):
        super().__init__(daemon=True, name="watcher")
        self.api, self.every = Api(url), every
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.first_seen: dict[str, float] = {}
        self.timeline: list[dict] = []
        self.latest: dict | None = None
        self.errors = 0
        self.job_started: float | None = None

    def note(self, info: dict, now: float):
        q = info.get("qinco") or {}
        job = q.get("job") or {}
        model = q.get("model") or {}
        keys = [f"phase:{q.get('phase')}", f"status:{info.get('status')}"]
        if job:
            keys.append(f"job:{job.get('phase')}")
            if job.get("started") and self.job_started is None:
                self.job_started = float(job["started"])
        if model.get("generation", 0) >= 1:
            keys.append("model")
            if q.get("phase") == "ready":
                keys.append("swapped")
        sample = {"t": now, "phase": q.get("phase"), "job_phase": job.get("phase"), "progress": job.get("progress"),
                  "val_mse": job.get("val_mse"), "rq_val_mse": job.get("rq_val_mse"),
                  "points_encoded": job.get("points_encoded"), "points_total": job.get("points_total"),
                  "points_count": info.get("points_count")}
        with self.lock:
            self.latest = info
            new = [k for k in keys if k not in self.first_seen]
            for k in new:
                self.first_seen[k] = now
            last = self.timeline[-1] if self.timeline else None
            if new or last is None or now - last["t"] >= 10 or (sample["phase"], sample["job_phase"]) != (
                    last["phase"], last["job_phase"]):
                self.timeline.append(sample)

    def run(self):
        while not self.stop.is_set():
            try:
                self.note(self.api.info(), time.time())
            except (httpx.HTTPError, RuntimeError):
                self.errors += 1
            self.stop.wait(self.every)

    def seen(self, key: str) -> float | None:
        with self.lock:
            return self.first_seen.get(key)


def exact_truth(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The id of each query's nearest neighbour among the uploaded vectors (ids are row numbers)."""
    flat = faiss.IndexFlatL2(base.shape[1])
    flat.add(np.ascontiguousarray(base))
    return flat.search(np.ascontiguousarray(queries), 1)[1][:, 0]


def measure_search(api: Api, queries: np.ndarray, truth: np.ndarray, params: dict | None) -> dict:
    """One client, one query per request, limit 10: recall@1/@10, QPS and latency."""
    lat, found = [], np.full((len(queries), 10), -1, dtype=np.int64)
    body = {"limit": 10, "with_payload": False, **({"params": params} if params else {})}
    t0 = time.perf_counter()
    for i, q in enumerate(queries.tolist()):
        t = time.perf_counter()
        hits = api.call("POST", "/points/search", json={**body, "vector": q})
        lat.append(time.perf_counter() - t)
        ids = [h["id"] for h in hits][:10]
        found[i, :len(ids)] = ids
    wall = time.perf_counter() - t0
    p50, p99 = percentiles(lat)
    return {"params": params or "default", "R@1": float((found[:, :1] == truth[:, None]).any(1).mean()),
            "R@10": float((found == truth[:, None]).any(1).mean()), "qps": len(queries) / wall,
            "p50_ms": p50, "p99_ms": p99}


def search_rows(api: Api, queries: np.ndarray, truth: np.ndarray, stage: str, points: int) -> list[dict]:
    rows = []
    for params in (None, {"rescore": True}):
        try:
            row = measure_search(api, queries, truth, params)
        except RuntimeError as e:  # e.g. rescore refused: keep the other figures
            row = {"params": params or "default", "error": str(e)}
        rows.append({"stage": stage, "points": points, **row})
    return rows


def faiss_rows(model_path: Path, learn: np.ndarray, base: np.ndarray, queries: np.ndarray, truth: np.ndarray,
               nbytes: int) -> list[dict]:
    """faiss IVF-PQ and IVF-RQ at the same bytes, over the collection's own centroids, trained on the
    points the collection held when it started training, at the service's default nprobe (16).
    In-process: their QPS is not comparable with the REST rows, their recall is."""
    from bench.search import build_faiss, sweep_faiss
    from model.io import load_model

    model = load_model(model_path)
    rows = []
    for kind in ("PQ", "RQ"):
        index, _, ivf = build_faiss(kind, model, learn, base, nbytes)
        for row in sweep_faiss(index, ivf, queries, truth, [16]):
            name = f"faiss IVF-{kind} ({nbytes}{'+1' if kind == 'RQ' else ''} B, in-process)"
            rows.append({"stage": name, "points": len(base), "params": f"nprobe {row['nprobe']}", "R@1": row["R@1"],
                         "R@10": row["R@10"], "qps": row["qps"], "p50_ms": None, "p99_ms": None})
    return rows


def upload(api: Api, base: np.ndarray, start: int, stop: int, batch: int, log: list[dict]):
    for i0 in range(start, stop, batch):
        i1 = min(i0 + batch, stop)
        t_wall = time.time()
        seconds = api.upsert(base[i0:i1], i0)
        log.append({"start": t_wall, "end": t_wall + seconds, "points": i1 - i0, "seconds": seconds})


def throughput(batches: list[dict]) -> dict:
    if not batches:
        return {"points": 0, "batches": 0, "seconds": 0.0, "points_per_s": None, "p50_ms": None, "p99_ms": None}
    seconds = sum(b["seconds"] for b in batches)
    points = sum(b["points"] for b in batches)
    p50, p99 = percentiles([b["seconds"] for b in batches])
    return {"points": points, "batches": len(batches), "seconds": seconds, "points_per_s": points / seconds,
            "p50_ms": p50, "p99_ms": p99}


def wait_ready(api: Api, watcher: Watcher, max_wait: float, proc: subprocess.Popen) -> dict:
    """Until the first model serves (generation >= 1, phase ready) and every point is in its index."""
    started = time.time()
    deadline = started + max_wait
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        info = api.info()
        watcher.note(info, time.time())
        q = info.get("qinco") or {}
        model = q.get("model") or {}
        if q.get("phase") == "ready" and model.get("generation", 0) >= 1:
            if (q.get("points_encoded") or 0) >= (info.get("points_count") or 0):
                return info
        elif not q.get("job") and q.get("phase") == "collecting":
            if q.get("last_error"):
                raise RuntimeError(f"the training job ended without a model: {q['last_error']}")
            if time.time() > started + 120:
                raise RuntimeError("no training job started within 120s of reaching train_after")
        time.sleep(watcher.every)
    raise RuntimeError(f"no model served after {max_wait:.0f}s: {json.dumps(api.info().get('qinco'))[:1000]}")


def since(t: float | None, t0: float) -> float | None:
    return None if t is None else t - t0


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="wordnet-minilm-384", choices=datasets.NAMES)
    p.add_argument("--train-after", type=int, default=20_000, help="qinco.train_after: points that start training")
    p.add_argument("--train-minutes", type=float, help="qinco.train_minutes (default: not sent, the server's)")
    p.add_argument("--bytes", type=int, default=8, help="qinco.bytes per vector")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1000, help="points per upsert request")
    p.add_argument("--limit-base", type=int, help="upload only the first N base vectors (quick runs)")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--data-dir", type=Path, help="a fresh (empty) directory, kept; default: a temporary one, removed")
    p.add_argument("--threads", type=int, default=0, help="QINCO_THREADS for the server (0: all cores)")
    p.add_argument("--poll", type=float, default=0.25, help="seconds between polls of the collection info")
    p.add_argument("--max-wait-minutes", type=float, default=240, help="give up when no model serves by then")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)

    ds = datasets.load(args.dataset)
    base = ds.base[:args.limit_base] if args.limit_base else ds.base
    queries = np.ascontiguousarray(ds.queries[:args.queries])
    n, d = len(base), ds.d
    if not 1 <= args.train_after <= n:
        p.error(f"--train-after must be in 1..{n} (the base vectors uploaded)")
    n0 = args.train_after - 1  # still collecting at n0 points; point n0 starts training

    tmp = None
    data_dir = args.data_dir or Path(tmp := tempfile.mkdtemp(prefix="qinco-selftrain-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    if any(data_dir.iterdir()) and not tmp:
        p.error(f"{data_dir} is not empty: the benchmark needs a fresh data directory")
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "server.log"
    qinco = {"bytes": args.bytes, "train_after": args.train_after, "keep_originals": True}
    if args.train_minutes is not None:
        qinco["train_minutes"] = args.train_minutes
    create = {"vectors": {"size": d, "distance": DISTANCE[ds.metric]}, "qinco": qinco}
    print(f"{args.dataset}: {n:,} base vectors (d={d}, {ds.metric}), {len(queries)} queries; "
          f"PUT {json.dumps(create)}", flush=True)

    report = {"dataset": args.dataset, "d": d, "metric": ds.metric, "base": n, "queries": len(queries),
              "batch": args.batch, "create": create, "threads": args.threads}
    proc = start_server(data_dir, port, {"QINCO_THREADS": str(args.threads), "QINCO_API_KEY": "",
                                         "QINCO_DEMO": "false"}, log_path)
    watcher = Watcher(url, args.poll)
    failed = False
    try:
        api = Api(url)
        report["created"] = api.call("PUT", "", json=create)
        batches: list[dict] = []

        # 1. collecting: exact search over the prefix
        upload(api, base, 0, n0, args.batch, batches)
        collecting = throughput(batches)
        info = api.info()
        phase = (info.get("qinco") or {}).get("phase")
        print(f"collecting: {n0:,} points uploaded at {fmt(collecting['points_per_s'], ',.0f')} points/s; "
              f"phase {phase!r}; measuring exact search", flush=True)
        report["before"] = {"phase": phase, "status": info.get("status"), "rss_kib": rss_kib(proc.pid),
                            "qinco": info.get("qinco")}
        rows = search_rows(api, queries, exact_truth(base[:n0], queries), f"before ({phase})", n0)

        # 2. the point that reaches train_after; 3. the rest while the job runs
        watcher.start()
        t_trigger_start = time.time()
        trigger = []
        upload(api, base, n0, n0 + 1, 1, trigger)
        t_trigger = trigger[0]["end"]
        rest: list[dict] = []
        upload(api, base, n0 + 1, n, args.batch, rest)
        t_uploaded = time.time()
        print(f"uploaded {n:,} points ({n - n0 - 1:,} while the job ran) in {t_uploaded - t_trigger_start:.1f}s; "
              f"waiting for the first model", flush=True)
        final = wait_ready(api, watcher, args.max_wait_minutes * 60, proc)
        watcher.stop.set()
        watcher.join(timeout=10)

        q = final.get("qinco") or {}
        seen = watcher.first_seen
        t_train = watcher.job_started or seen.get("phase:training") or seen.get("job:training")
        t_encode = min((seen[k] for k in ("phase:encoding", "job:encoding", "job:swapping") if k in seen),
                       default=None)
        t_swap = q.get("last_swap") or seen.get("swapped")
        if t_encode is None:  # encoding went by between two polls: it ended before the swap was seen
            t_encode_note = "not observed (shorter than one poll)"
        else:
            t_encode_note = None
        events = {"train_after_reached": t_trigger, "training_started": t_train, "encoding_started": t_encode,
                  "swapped": t_swap, "upload_done": t_uploaded}
        timing = {
            "queue_s": since(t_train, t_trigger),
            "training_s": since(t_encode, t_train) if t_train else None,
            "time_to_first_trained_model_s": since(t_encode, t_trigger),
            "encode_and_swap_s": since(t_swap, t_encode) if t_encode else None,
            "time_to_first_served_model_s": since(t_swap, t_trigger),
            "upload_after_trigger_s": t_uploaded - t_trigger_start,
            "encoding_note": t_encode_note}

        # upload batches sorted by the phase they ended in
        def phase_of(b):
            if t_swap and b["end"] >= t_swap:
                return "ready"
            if t_encode and b["end"] >= t_encode:
                return "encoding"
            return "training"

        uploads = {"collecting": collecting, "trigger_point": throughput(trigger)}
        for name in ("training", "encoding", "ready"):
            uploads[f"while {name}"] = throughput([b for b in rest if phase_of(b) == name])
        uploads["after train_after, all"] = throughput(rest)

        # 4. QINCo search over the whole base
        model = q.get("model") or {}
        print(f"model generation {model.get('generation')} serving {fmt(q.get('points_encoded'), ',')} points; "
              f"mse_vs_rq {model.get('mse_vs_rq')}; measuring search", flush=True)
        truth = exact_truth(base, queries)
        rows += search_rows(api, queries, truth, "after (QINCo)", n)
        model_file = data_dir / "collections" / COLLECTION / f"model-{model.get('generation')}.safetensors"
        print("faiss baselines at the same bytes, same centroids and training points", flush=True)
        rows += faiss_rows(model_file, np.ascontiguousarray(base[:args.train_after]), np.ascontiguousarray(base),
                           queries, truth, args.bytes)
        report.update({"events_unix": events, "timing": timing, "uploads": uploads, "search": rows,
                       "model": model, "after": {"rss_kib": rss_kib(proc.pid), "qinco": q,
                                                 "points_count": final.get("points_count")},
                       "job_timeline": [{**s, "t": s["t"] - t_trigger} for s in watcher.timeline],
                       "first_seen_s": {k: v - t_trigger for k, v in sorted(seen.items(), key=lambda kv: kv[1])},
                       "watcher_errors": watcher.errors})
    except Exception as e:  # noqa: BLE001 - report what was measured, and the server's log
        failed = True
        report["error"] = f"{type(e).__name__}: {e}"
        print(f"FAILED: {report['error']}", file=sys.stderr)
        try:
            print("server log (tail):\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-30:]),
                  file=sys.stderr)
        except OSError:
            pass
    finally:
        watcher.stop.set()
        stop_server(proc)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    if not failed:
        print_tables(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"selftrain-{args.dataset}{'-failed' if failed else ''}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {path}")
    return 1 if failed else 0


def print_tables(r: dict):
    m, t = r["model"], r["timing"]
    minutes = r["create"]["qinco"].get("train_minutes")
    budget = "the server's default budget" if minutes is None else f"a {minutes:g}-minute budget"
    print(f"\n### Self-training collection: {r['dataset']}, {r['base']:,} points, "
          f"{r['create']['qinco']['bytes']} bytes, train_after {r['create']['qinco']['train_after']:,}, "
          f"{budget}\n")
    print("| step | seconds after train_after was reached |")
    print("|---|---|")
    print(f"| training started (job.started) | {fmt(t['queue_s'], '.1f')} |")
    print(f"| training ended, encoding began: first trained model | {fmt(t['time_to_first_trained_model_s'], '.1f')} |")
    print(f"| swap: the model serves (generation 1, ready) | {fmt(t['time_to_first_served_model_s'], '.1f')} |")
    print(f"\ntraining {fmt(t['training_s'], '.1f')} s, encode and swap {fmt(t['encode_and_swap_s'], '.1f')} s"
          + (f" ({t['encoding_note']})" if t["encoding_note"] else "")
          + f"; model: mse_vs_rq {fmt(m.get('mse_vs_rq'), '.4f')}, val_mse {fmt(m.get('val_mse'), '.4f')}, "
          f"rq_val_mse {fmt(m.get('rq_val_mse'), '.4f')}, trained on {fmt(m.get('trained_on'), ',')}, "
          f"nlist {m.get('nlist')}; bytes per point {r['after']['qinco'].get('bytes_per_point')}\n")
    print(f"| upload ({r['batch']} points a request) | points | points/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for name, u in r["uploads"].items():
        if u["points"]:
            print(f"| {name} | {u['points']:,} | {u['points_per_s']:,.0f} | {u['p50_ms']:.1f} | {u['p99_ms']:.1f} |")
    print("\n| search (1 client, limit 10) | points | params | R@1 | R@10 | QPS | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for s in r["search"]:
        params = s["params"] if isinstance(s["params"], str) else "rescore"
        if "error" in s:
            print(f"| {s['stage']} | {s['points']:,} | {params} | error: {s['error'][:80]} | | | | |")
        else:
            print(f"| {s['stage']} | {s['points']:,} | {params} | {s['R@1']:.3f} | {s['R@10']:.3f} | "
                  f"{s['qps']:,.0f} | {fmt(s['p50_ms'], '.2f')} | {fmt(s['p99_ms'], '.2f')} |")


if __name__ == "__main__":
    sys.exit(main())
