"""kill -9 during a bulk load and during the background re-encode (issue #26 item 4).

    python -m bench.crash_bulk --n 1000000                     # GloVe-derived, the demo model
    python -m bench.crash_bulk --n 969003 --data minilm        # the real 1M set, a self-training collection

One collection, N points uploaded in batches (PUT .../points?wait=true, ids 0..N-1, payload
{"i": id}) by one client.  `--upload-kills` times the server is killed with SIGKILL while the
upload runs, then `--encode-kills` times while the collection is not yet green (the background
re-encode with `balanced` codes; for minilm also the training job and the swap), each at a
random moment `--min-seconds`..`--max-seconds` after the (re)start.  After every restart:
  * restart time: from the process's start until a search answers;
  * count (exact) equals the acknowledged points, plus the batch in flight at the kill,
    which is there whole or not at all;
  * the batch in flight and a random sample of the acknowledged points are read back with their
    payload and vector: the payload is their own, the vector is near their own (cosine > 0.5,
    mean > 0.9: the codes' reconstruction; originals come back exact);
then the upload resumes after the last acknowledged batch.  At the end (green with --wait-green):
every id 0..N-1 by scroll, and the count.  Prints a line per restart; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.scale import proc_status, vectors
from bench.soak import DEFAULT_MODEL, free_port, start_server

COLLECTION = "c"


class Server:
    """The server process on one data directory, restarted on a new port after each kill."""

    def __init__(self, data: Path, env: dict):
        self.data, self.env, self.starts = data, env, 0
        self.proc = None
        self.url = ""

    def start(self, probe: np.ndarray | None) -> float:
        """Seconds from the process's start until a search answers (or /readyz, with no collection)."""
        t0 = time.time()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = start_server(self.data, port, self.env, self.data / f"server-{self.starts}.log", timeout=600)
        self.starts += 1
        while probe is not None:
            try:
                r = httpx.post(f"{self.url}/collections/{COLLECTION}/points/query",
                               json={"query": probe.tolist(), "limit": 1}, timeout=60)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return time.time() - t0

    def kill_after(self, seconds: float) -> threading.Timer:
        proc = self.proc
        timer = threading.Timer(seconds, lambda: proc.send_signal(signal.SIGKILL))
        timer.start()
        return timer

    def wait_killed(self):
        self.proc.wait()


def upload(url: str, x: np.ndarray, start: int, batch: int, acked: list[int], in_flight: list):
    """Batches from `start` on, until the server dies (or all are sent).  acked[0]: the points
    acknowledged so far (a prefix of the ids); in_flight[0]: the batch sent and not answered."""
    with httpx.Client(timeout=300) as client:
        for i0 in range(start, len(x), batch):
            ids = list(range(i0, min(i0 + batch, len(x))))
            body = {"points": [{"id": i, "vector": x[i].tolist(), "payload": {"i": i}} for i in ids]}
            in_flight[0] = ids
            try:
                r = client.put(f"{url}/collections/{COLLECTION}/points", params={"wait": "true"}, json=body)
            except httpx.HTTPError:
                return  # killed: this batch is in flight
            if r.status_code != 200:
                raise RuntimeError(f"upload failed: {r.status_code} {r.text[:300]}")
            acked[0], in_flight[0] = ids[-1] + 1, []


def retrieve(url: str, ids: list[int]) -> dict[int, dict]:
    out = {}
    for i0 in range(0, len(ids), 1000):
        r = httpx.post(f"{url}/collections/{COLLECTION}/points", timeout=120,
                       json={"ids": ids[i0:i0 + 1000], "with_payload": True, "with_vector": True})
        r.raise_for_status()
        out.update({p["id"]: p for p in r.json()["result"]})
    return out


def check(url: str, x: np.ndarray, acked: int, in_flight: list[int], rng: np.random.Generator) -> tuple[list[str], int]:
    """Problems after a restart, and the points present (acked, plus the in-flight batch if kept)."""
    problems = []
    count = httpx.post(f"{url}/collections/{COLLECTION}/points/count", json={"exact": True}, timeout=120).json()["result"]["count"]
    got = retrieve(url, in_flight) if in_flight else {}
    if got and len(got) != len(in_flight):
        problems.append(f"the batch in flight is there in part: {len(got)} of {len(in_flight)}")
    present = acked + (len(in_flight) if len(got) == len(in_flight) and in_flight else 0)
    if count != present:
        problems.append(f"count {count}, expected {present} ({acked} acknowledged, in flight {len(in_flight)}, "
                        f"{len(got)} of them found)")
    sample = sorted(set(rng.integers(0, acked, 500).tolist())) if acked else []
    found = retrieve(url, sample)
    if len(found) != len(sample):
        problems.append(f"acknowledged points lost: {sorted(set(sample) - set(found))[:10]}")
    own, nearer = [], []  # cosine to its own vector; and is it nearer its own than another point's
    for i, p in {**found, **got}.items():
        if p["payload"] != {"i": i}:
            problems.append(f"point {i}: payload {p['payload']}")
        v = np.asarray(p["vector"], np.float32)
        other = x[int(rng.integers(0, max(acked, 1)))]
        own.append(cosine(v, x[i]))
        nearer.append(own[-1] > cosine(v, other))
    if own and (np.mean(own) < 0.8 or np.mean(nearer) < 0.98):
        problems.append(f"vectors not their own: mean cosine {np.mean(own):.3f}, "
                        f"nearer their own than another's: {np.mean(nearer):.3f}")
    return problems, present


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def status(url: str) -> str:
    return httpx.get(f"{url}/collections/{COLLECTION}", timeout=60).json()["result"]["status"]


def scroll_ids(url: str) -> np.ndarray:
    ids, offset = [], None
    while True:
        body = {"limit": 10_000, "with_payload": False, "with_vector": False, **({"offset": offset} if offset is not None else {})}
        r = httpx.post(f"{url}/collections/{COLLECTION}/points/scroll", json=body, timeout=300).json()["result"]
        ids += [p["id"] for p in r["points"]]
        offset = r["next_page_offset"]
        if offset is None:
            return np.array(ids, dtype=np.int64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--data", choices=("glove", "minilm"), default="glove")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--upload-kills", type=int, default=5)
    p.add_argument("--encode-kills", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=10)
    p.add_argument("--max-seconds", type=float, default=60)
    p.add_argument("--train-minutes", type=float, default=10.0, help="minilm: the collection's training budget")
    p.add_argument("--snapshot-every", type=int, default=50_000)
    p.add_argument("--wait-green", action="store_true", help="before the last checks, wait for the re-encode to end")
    p.add_argument("--green-timeout", type=float, default=4 * 3600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="data directory (default: a temporary one, removed when all passed)")
    p.add_argument("--out", type=Path, help="also write the restarts as JSON here")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    data = args.work or Path(tempfile.mkdtemp(prefix="qinco-crash-bulk-"))
    (data / "models").mkdir(parents=True, exist_ok=True)
    if args.data == "minilm":
        from bench.corpus import load
        x = load()["base"][:args.n]
        body = {"vectors": {"size": x.shape[1], "distance": "Cosine"}, "qinco": {"train_minutes": args.train_minutes,
                                                                          "train_after": min(20_000, args.n // 2)}}
    else:
        x = vectors(args.n, 50)
        shutil.copy(DEFAULT_MODEL, data / "models" / "m.safetensors")
        body = {"model": "models/m.safetensors", "metric": "cosine"}
    server = Server(data, {"QINCO_SNAPSHOT_EVERY": str(args.snapshot_every), "QINCO_API_KEY": ""})
    server.start(None)
    httpx.put(f"{server.url}/collections/{COLLECTION}", json=body, timeout=300).raise_for_status()

    acked, in_flight, restarts, failed = [0], [[]], [], False
    print("kill  phase    at      acked   status before  restart  RSS MiB  result", flush=True)
    kills = 0
    while kills < args.upload_kills + args.encode_kills:
        phase = "upload" if acked[0] < len(x) else "encode"
        if phase == "encode" and status(server.url) == "green":
            print(f"green after {kills} kills: no more to kill in the re-encode", flush=True)
            break
        before = status(server.url)
        delay = rng.uniform(args.min_seconds, args.max_seconds)
        timer = server.kill_after(delay)
        if phase == "upload":
            upload(server.url, x, acked[0], args.batch, acked, in_flight)
            if acked[0] >= len(x):  # finished before the kill (unless it came just now)
                timer.cancel()
                time.sleep(0.5)
                if server.proc.poll() is None:
                    continue
        server.wait_killed()
        kills += 1
        restart = server.start(x[0])
        rss = proc_status(server.proc.pid, "VmRSS") / 1024
        problems, present = check(server.url, x, acked[0], in_flight[0], rng)
        acked[0], in_flight[0] = present, []
        failed |= bool(problems)
        restarts.append({"phase": phase, "kill_after_s": round(delay, 1), "acked": present, "status_before": before,
                         "restart_s": round(restart, 2), "rss_mib": round(rss), "problems": problems})
        print(f"{kills:4d}  {phase:7s} {delay:5.1f}s {present:9,d}   {before:13s} {restart:6.2f}s  {rss:7.0f}  "
              f"{'FAIL' if problems else 'PASS'}", flush=True)
        for line in problems:
            print(f"      {line}", flush=True)
    if acked[0] < len(x):
        upload(server.url, x, acked[0], args.batch, acked, in_flight)
    t0 = time.time()
    while args.wait_green and status(server.url) != "green":
        if time.time() - t0 > args.green_timeout:
            raise SystemExit(f"not green after {args.green_timeout} s; data in {data}")
        time.sleep(5)
    print(f"status {status(server.url)}, {time.time() - t0:.0f} s after the last restart", flush=True)
    ids = scroll_ids(server.url)
    count = httpx.post(f"{server.url}/collections/{COLLECTION}/points/count", json={"exact": True}).json()["result"]["count"]
    if count != len(x) or not np.array_equal(ids, np.arange(len(x))):
        failed = True
        print(f"FAIL at the end: count {count}, scroll {len(ids)} ids, expected 0..{len(x) - 1}", flush=True)
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(60)
    worst = max((r["restart_s"] for r in restarts), default=0.0)
    print(f"{len(restarts)} kills, restart at most {worst:.2f} s; crash_bulk: {'FAIL' if failed else 'PASS'}")
    if args.out:
        args.out.write_text(json.dumps({"n": len(x), "data": args.data, "restarts": restarts, "passed": not failed}, indent=1))
    if not failed and not args.work:
        shutil.rmtree(data, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
