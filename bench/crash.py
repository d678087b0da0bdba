"""Crash campaign: kill -9 a real `qinco serve` at random moments, restart, check nothing was lost.

    python -m bench.crash --rounds 20

Each round starts the server on the same data directory (QINCO_SNAPSHOT_EVERY is
low, so snapshots are written all the time), checks the state the previous kill
left, then runs writers (upsert batches of new ids into `main`, deletes of whole
earlier batches) and one collection client (creates `tmp-*` collections, writes a
batch into each, deletes older ones) and kills the server with SIGKILL: at a
random moment, or as soon as a snapshot, a collection creation or a collection
deletion is seen in progress on disk (the kill mode cycles through these).

After each restart:
  * every acknowledged upsert batch is fully there, with its payloads; every
    acknowledged delete is fully gone; every unacknowledged batch or delete is
    all-or-nothing (and, once seen, stays as seen);
  * nothing half-created: every listed collection answers info, count and
    search; acknowledged creates are listed, acknowledged deletes are not; no
    collection that was never asked for appears;
  * count equals the number of present points, in every collection.
The batches written in the round just killed are checked id by id; older ones by
count and a random sample (and all of them id by id after the last round).
Prints PASS/FAIL per round; exit status 1 when any round failed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.soak import DEFAULT_MODEL, free_port, load_vectors, start_server

MODES = ["random", "snapshot", "create", "random", "delete-collection"]


def expected_state(acked: bool, delete_sent: bool, delete_acked: bool, state: str | None) -> str | None:
    """present / absent / None (either, all-or-nothing) for a write and its possible delete."""
    if delete_acked:
        return "absent"
    if delete_sent:
        return None if state != "absent" else "absent"
    if state is not None:
        return state
    return "present" if acked else None


@dataclass
class Batch:
    bid: int
    collection: str
    ids: list[int]
    rows: list[int]
    round: int
    acked: bool = False
    delete_sent: bool = False
    delete_acked: bool = False
    state: str | None = None  # "present" / "absent" once known for sure

    def payload(self, k: int) -> dict:
        return {"batch": self.bid, "k": k}

    def expected(self) -> str | None:
        return expected_state(self.acked, self.delete_sent, self.delete_acked, self.state)


@dataclass
class Coll:
    name: str
    create_sent: bool = False
    create_acked: bool = False
    delete_sent: bool = False
    delete_acked: bool = False
    state: str | None = None
    batches: list[Batch] = field(default_factory=list)

    def expected(self) -> str | None:
        return expected_state(self.create_acked, self.delete_sent, self.delete_acked, self.state)


class Campaign:
    def __init__(self, args, data_dir: Path, vectors: np.ndarray):
        self.args, self.data_dir, self.vectors = args, data_dir, vectors
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.batches: list[Batch] = []
        self.colls: dict[str, Coll] = {"main": Coll("main", True, True, state="present")}
        self.next_id = 1
        self.next_bid = 0
        self.next_coll = 0
        self.errors: list[str] = []  # unexpected HTTP answers while the server was alive

    # ---- load ------------------------------------------------------------------------------
    def new_batch(self, collection: str, n: int, round_: int, rng: random.Random) -> Batch:
        with self.lock:
            ids = list(range(self.next_id, self.next_id + n))
            self.next_id += n
            b = Batch(self.next_bid, collection, ids, [rng.randrange(len(self.vectors)) for _ in ids], round_)
            self.next_bid += 1
            self.batches.append(b)
            return b

    def upsert(self, client: httpx.Client, b: Batch) -> bool:
        points = [{"id": i, "vector": self.vectors[r].tolist(), "payload": b.payload(k)}
                  for k, (i, r) in enumerate(zip(b.ids, b.rows))]
        r = client.put(f"/collections/{b.collection}/points", json={"points": points})
        if r.status_code == 200:
            b.acked = True
        elif not (r.status_code == 404 and b.collection != "main"):
            self.errors.append(f"upsert {b.collection}: {r.status_code} {r.text[:200]}")
        return r.status_code == 200

    def writer(self, url: str, round_: int, seed: int, stop: threading.Event):
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                try:
                    if rng.random() < 0.15:  # delete a whole earlier batch of `main`
                        with self.lock:
                            choices = [b for b in self.batches if b.collection == "main" and b.acked
                                       and not b.delete_sent and b.state != "absent"]
                            b = rng.choice(choices) if choices else None
                            if b is not None:
                                b.delete_sent = True
                        if b is not None:
                            r = client.post("/collections/main/points/delete", json={"points": b.ids})
                            if r.status_code == 200:
                                b.delete_acked = True
                            else:
                                self.errors.append(f"delete: {r.status_code} {r.text[:200]}")
                    else:
                        self.upsert(client, self.new_batch("main", rng.randint(1, self.args.batch), round_, rng))
                except httpx.HTTPError:
                    return  # the server died mid-request: what was in flight is unacknowledged

    def collection_client(self, url: str, round_: int, seed: int, stop: threading.Event):
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120) as client:
            while not stop.is_set():
                try:
                    live = [c for c in self.colls.values() if c.name != "main" and not c.delete_sent
                            and c.expected() != "absent"]
                    if len(live) >= self.args.max_collections or (live and rng.random() < 0.3):
                        c = rng.choice(live)
                        c.delete_sent = True
                        r = client.delete(f"/collections/{c.name}")
                        if r.status_code == 200:
                            c.delete_acked = True
                        else:
                            self.errors.append(f"delete collection {c.name}: {r.status_code} {r.text[:200]}")
                        continue
                    name = f"tmp-{self.next_coll}"
                    self.next_coll += 1
                    c = self.colls[name] = Coll(name)
                    c.create_sent = True
                    r = client.put(f"/collections/{name}", json={"model": "models/crash.safetensors",
                                                                  "encoder": "fast"})
                    if r.status_code != 200:
                        self.errors.append(f"create {name}: {r.status_code} {r.text[:200]}")
                        continue
                    c.create_acked = True
                    b = self.new_batch(name, rng.randint(1, self.args.batch), round_, rng)
                    c.batches.append(b)
                    self.upsert(client, b)
                except httpx.HTTPError:
                    return

    # ---- checks ----------------------------------------------------------------------------
    def check(self, url: str, round_: int, full: bool) -> list[str]:
        problems: list[str] = []
        with httpx.Client(base_url=url, timeout=120) as client:
            listed = {c["name"] for c in client.get("/collections").json()["result"]["collections"]}
            q = self.vectors[0].tolist()
            for name in sorted(listed):  # nothing half-created: every listed collection answers
                c = self.colls.get(name)
                if c is None or not c.create_sent:
                    problems.append(f"collection {name!r} listed but never created")
                    continue
                info = client.get(f"/collections/{name}")
                count = client.get(f"/collections/{name}/points/count")
                search = client.post(f"/collections/{name}/points/search", json={"vector": q, "limit": 3})
                for what, r in (("info", info), ("count", count), ("search", search)):
                    if r.status_code != 200:
                        problems.append(f"collection {name!r} listed but {what} answers {r.status_code} {r.text[:200]}")
            for c in self.colls.values():
                want, seen = c.expected(), "present" if c.name in listed else "absent"
                if want is not None and want != seen:
                    problems.append(f"collection {c.name!r} {seen}, expected {want} "
                                    f"(create acked {c.create_acked}, delete sent {c.delete_sent}/acked {c.delete_acked})")
                c.state = seen
                if c.delete_sent and not c.delete_acked:  # resolved: the delete is durable or lost
                    c.delete_acked = c.delete_sent = seen == "absent"
            for name in listed:
                expected_count = 0
                batches = [b for b in self.batches if b.collection == name]
                for b in batches:
                    if not full and b.round < round_ and b.expected() is not None and self.rng.random() > 0.05:
                        if b.expected() == "present":  # an older batch already checked id by id: count it
                            expected_count += len(b.ids)
                        continue
                    present, wrong = [], []
                    for k, (i, _r) in enumerate(zip(b.ids, b.rows)):
                        r = client.get(f"/collections/{name}/points/{i}")
                        present.append(r.status_code == 200)
                        if r.status_code == 200 and r.json()["result"]["payload"] != b.payload(k):
                            wrong.append(i)
                    seen = "present" if all(present) else "absent" if not any(present) else "half"
                    want = b.expected()
                    if seen == "half":
                        problems.append(f"batch {b.bid} in {name!r} half there: {sum(present)}/{len(present)} ids "
                                        f"(acked {b.acked}, delete sent {b.delete_sent}/acked {b.delete_acked})")
                    elif want is not None and want != seen:
                        problems.append(f"batch {b.bid} in {name!r} {seen}, expected {want} (ids {b.ids[0]}.., "
                                        f"acked {b.acked}, delete sent {b.delete_sent}/acked {b.delete_acked})")
                    if wrong:
                        problems.append(f"batch {b.bid} in {name!r}: wrong payload for ids {wrong[:5]}")
                    if seen != "half":
                        b.state = seen
                        if b.delete_sent:  # resolved: the delete is now either durable or lost
                            b.delete_acked = seen == "absent"
                            b.delete_sent = seen == "absent"
                    if seen == "present":
                        expected_count += len(b.ids)
                    elif seen == "half":
                        expected_count += sum(present)
                problems += self.findable(client, name, [b for b in batches if b.round == round_ and b.state == "present"])
                count = client.get(f"/collections/{name}/points/count")
                if count.status_code == 200 and count.json()["result"]["count"] != expected_count:
                    problems.append(f"collection {name!r}: count {count.json()['result']['count']}, "
                                    f"{expected_count} points present")
        return problems


    def findable(self, client: httpx.Client, name: str, batches: list[Batch]) -> list[str]:
        """Present points are in the index too, not only in the database: searching a sample of them by
        their own vector finds (nearly) all of them."""
        sample = [(i, r) for b in batches for i, r in zip(b.ids, b.rows)]
        sample = self.rng.sample(sample, min(len(sample), 40))
        if not sample:
            return []
        found = 0
        for params in ({"nprobe": 64, "nshort": 300},):
            searches = [{"vector": self.vectors[r].tolist(), "limit": 10, "with_payload": False, "params": params}
                        for _, r in sample]
            res = client.post(f"/collections/{name}/points/search/batch", json={"searches": searches})
            if res.status_code != 200:
                return [f"collection {name!r}: batch search answers {res.status_code} {res.text[:200]}"]
            found = sum(i in {h["id"] for h in hits} for (i, _), hits in zip(sample, res.json()["result"]))
            break
        if found < 0.9 * len(sample):
            return [f"collection {name!r}: only {found}/{len(sample)} present points found by their own vector"]
        return []


def in_progress(data_dir: Path) -> list[str]:
    root = data_dir / "collections"
    seen = []
    for p in root.iterdir() if root.exists() else []:
        if p.name.startswith(".new-"):
            seen.append("create")
        elif p.name.startswith(".deleted-"):
            seen.append("delete-collection")
        elif p.is_dir() and ((p / ".snapshot.tmp").exists() or (p / ".snapshot.old").exists()):
            seen.append(f"snapshot:{p.name}")
    return sorted(set(seen))


def wait_for(data_dir: Path, mode: str, timeout: float) -> bool:
    """Poll the data directory until an operation of this kind is seen in progress."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = in_progress(data_dir)
        if any(s == mode or s.startswith(mode + ":") for s in seen):
            return True
        time.sleep(0.001)
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=3, help="point writers (plus one collection client)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=30, help="largest upsert batch")
    ap.add_argument("--snapshot-every", type=int, default=40, help="QINCO_SNAPSHOT_EVERY: low, so snapshots run all the time")
    ap.add_argument("--max-collections", type=int, default=3, help="tmp collections alive at once")
    ap.add_argument("--min-seconds", type=float, default=0.5)
    ap.add_argument("--max-seconds", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, help="default: a temporary directory, removed when every round passed")
    args = ap.parse_args(argv)

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="qinco-crash-"))
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(args.model, data_dir / "models" / "crash.safetensors")
    env = {"QINCO_SNAPSHOT_EVERY": str(args.snapshot_every), "QINCO_API_KEY": ""}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(data_dir, port, env, data_dir / "server-0.log")
    r = httpx.put(f"{url}/collections/main", json={"model": "models/crash.safetensors", "encoder": "fast"}, timeout=300)
    if r.status_code != 200:
        proc.kill()
        raise SystemExit(f"cannot create main: {r.status_code} {r.text}")
    vectors = load_vectors(5000, httpx.get(f"{url}/collections/main").json()["result"]["dimension"])  # creation answers true
    campaign = Campaign(args, data_dir, vectors)
    results = []
    started = time.time()
    print("round  mode               kill at  in progress at kill       acked  restart  result")
    try:
        for round_ in range(1, args.rounds + 1):
            mode = MODES[(round_ - 1) % len(MODES)]
            stop = threading.Event()
            threads = [threading.Thread(target=campaign.writer, args=(url, round_, args.seed * 1000 + round_ * 10 + k, stop))
                       for k in range(args.clients)]
            threads.append(threading.Thread(target=campaign.collection_client,
                                            args=(url, round_, args.seed * 1000 + round_ * 10 + 9, stop)))
            acked_before = sum(b.acked for b in campaign.batches)
            t0 = time.time()
            for t in threads:
                t.start()
            delay = campaign.rng.uniform(args.min_seconds, args.max_seconds)
            if mode == "random":
                time.sleep(delay)
            else:  # let some load build up, then kill as soon as the operation is seen in progress
                time.sleep(campaign.rng.uniform(0, delay / 2))
                if not wait_for(data_dir, mode, 2 * args.max_seconds):
                    mode += " (not seen)"
            kill_at = time.time() - t0
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            seen = in_progress(data_dir)
            stop.set()
            for t in threads:
                t.join(120)
            acked = sum(b.acked for b in campaign.batches) - acked_before

            t1 = time.time()
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            try:
                proc = start_server(data_dir, port, env, data_dir / f"server-{round_}.log")
            except RuntimeError as e:
                results.append(False)
                print(f"{round_:5d}  {mode:18s} {kill_at:6.2f}s  {','.join(seen) or '-':24s}  {acked:5d}  "
                      f"   -     FAIL: server did not come back: {e}")
                break
            restart = time.time() - t1
            problems = campaign.check(url, round_, full=round_ == args.rounds)
            problems += campaign.errors
            campaign.errors = []
            results.append(not problems)
            print(f"{round_:5d}  {mode:18s} {kill_at:6.2f}s  {','.join(seen) or '-':24s}  {acked:5d}  "
                  f"{restart:5.1f}s   {'PASS' if not problems else 'FAIL'}", flush=True)
            for p in problems[:20]:
                print(f"         {p}", flush=True)
    finally:
        proc.kill()
        proc.wait()
    total = sum(len(b.ids) for b in campaign.batches if b.acked)
    print(f"{time.time() - started:.0f}s in all")
    print(f"{sum(results)}/{len(results)} rounds passed; {sum(b.acked for b in campaign.batches)} batches "
          f"({total} points) acknowledged, {len(campaign.colls) - 1} collections created; data in {data_dir}")
    ok = all(results) and len(results) == args.rounds
    if ok and not args.data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)
    print("crash:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
