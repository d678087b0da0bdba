"""Schemathesis against a live `qinco serve`: every route, no 5xx, no response-schema violation.

The server runs on a temporary data directory with the tiny session model and
two collections with points (`c`, l2, ids 0..199; `cos`, cosine, ids 0..49).
Schemathesis generates valid (positive) and invalid (negative) requests for
every operation of /openapi.json; a steering step makes sure path parameters
and bodies often reach real state (an existing collection, a stored id, the
right dimension, the real model path) instead of answering 404/400 every time.
Every failing request is collected (not shrunk, to keep the test bounded) and
the test fails with one curl reproduction per distinct failure.

QINCO_FUZZ_EXAMPLES (default 35) sets the examples per operation and mode;
QINCO_FUZZ_STRICT=1 also asserts status-code and content-type conformance
(informational otherwise: the OpenAPI lists only 200 and 422 for every route).
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from model.io import save_model  # noqa: E402
from service.engine.registry import Store  # noqa: E402
from tests.server import free_port, serve  # noqa: E402

EXAMPLES = int(os.environ.get("QINCO_FUZZ_EXAMPLES", "35"))
STRICT = os.environ.get("QINCO_FUZZ_STRICT") == "1"
D = 50
N_C, N_COS = 200, 50
MODEL = "models/ivf.safetensors"
# Collections the fuzzer may create and delete; `c` and `cos` are never deleted (they carry the points).
SCRATCH = ["scratch", "scratch-2"]
EXCLUSIVE = [("points", "batch"), ("points", "filter"), ("model", "index")]


@pytest.fixture(scope="module")
def live(tmp_path_factory, ivf_model, glove_sample):
    data = tmp_path_factory.mktemp("fuzz")
    (data / "models").mkdir()
    save_model(ivf_model, data / MODEL)
    store = Store(data)
    c = store.create("c", "l2", "fast", data / MODEL)
    c.upsert(list(range(N_C)), glove_sample[:N_C], [{"n": i, "tag": ["a", "b"][i % 2]} for i in range(N_C)])
    cos = store.create("cos", "cosine", "fast", data / MODEL)
    cos.upsert(list(range(N_COS)), glove_sample[:N_COS], [None] * N_COS)
    store.close()
    port = free_port()
    # Snapshots every few changed points, so the fuzzer's writes also run the snapshot path.
    proc = serve(data, port, "--no-demo", env={"QINCO_SNAPSHOT_EVERY": "20", "QINCO_THREADS": "1"})
    log = ServerLog(proc.log)  # the server's stderr (its tracebacks), written to a file by tests/server.py
    try:
        yield f"http://127.0.0.1:{port}", proc, log, glove_sample
    finally:
        proc.kill()
        proc.wait()


class ServerLog:
    """The lines of the server's log file, read when asked."""

    def __init__(self, file):
        self.file = file

    def lines(self) -> list[str]:
        self.file.seek(0)
        return self.file.read().decode(errors="replace").splitlines(keepends=True)


# ---- steering: bias generated cases toward real state ---------------------------------------
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
small = st.floats(-2, 2, allow_nan=False, width=32)
vector50 = st.one_of(*[st.lists(small, min_size=D, max_size=D)] * 4, st.lists(finite, min_size=D, max_size=D),
                     st.just([0.0] * D))
real_id = st.integers(0, N_C + 20)  # mostly stored ids, a few absent ones


def steer_vector(data, obj, fix):
    if fix and isinstance(obj, dict) and "vector" in obj:
        obj["vector"] = data.draw(vector50)
    if fix and isinstance(obj, dict) and isinstance(obj.get("limit"), int) and data.draw(st.booleans()):
        obj["limit"] = data.draw(st.integers(1, 30))


def steer_filter_keys(data, obj, depth=0):
    """Filter conditions (and payload index fields) often name payload keys that exist."""
    if depth > 12:
        return
    if isinstance(obj, dict):
        for k in ("key", "field_name"):
            if isinstance(obj.get(k), str) and data.draw(st.booleans()):
                obj[k] = data.draw(st.sampled_from(["n", "tag"]))
        for v in obj.values():
            steer_filter_keys(data, v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            steer_filter_keys(data, v, depth + 1)


def steer(case, data):
    """Rewrite part of a generated case in place so that it reaches the code behind the 404/400."""
    method, path = case.method.upper(), case.path
    params = case.path_parameters
    if params is not None and "name" in params:
        roll = data.draw(st.integers(0, 9))
        if method == "DELETE" and path == "/collections/{name}":
            if roll < 6:
                params["name"] = data.draw(st.sampled_from(SCRATCH))
            elif params["name"] in ("c", "cos"):
                params["name"] = "not-there"
        elif method == "PUT" and path == "/collections/{name}":
            if roll < 6:
                params["name"] = data.draw(st.sampled_from(SCRATCH + ["c"]))
        elif roll < 8:
            params["name"] = data.draw(st.sampled_from(["c", "c", "c", "cos", "cos"] + SCRATCH))
    if params is not None and "point_id" in params and data.draw(st.booleans()):
        params["point_id"] = data.draw(real_id)
    body = case.body
    if not isinstance(body, dict) or not data.draw(st.integers(0, 3)):
        return  # a quarter of the bodies stay exactly as schemathesis made them
    if path == "/collections/{name}" and method == "PUT" and "model" in body:
        body["model"] = MODEL
        body.pop("index", None)
    fix = data.draw(st.integers(0, 9)) > 0  # all vectors of the request get the right dimension, or none
    steer_vector(data, body, fix)
    for s in body.get("searches") or []:
        steer_vector(data, s, fix)
    points = body.get("points")
    if isinstance(points, list):
        for p in points:
            steer_vector(data, p, fix)
        if fix and all(isinstance(p, dict) and "id" in p for p in points) and data.draw(st.booleans()):
            ids = data.draw(st.lists(real_id, min_size=len(points), max_size=len(points), unique=True))
            for p, i in zip(points, ids):
                p["id"] = i
        if points and all(isinstance(p, int) for p in points) and data.draw(st.booleans()):
            body["points"] = data.draw(st.lists(real_id, min_size=1, max_size=5))
    for a, b in EXCLUSIVE:  # the OpenAPI does not say "one of these two" (the models' validators do)
        if a in body and b in body and body.get(a) is not None and body.get(b) is not None:
            body.pop(data.draw(st.sampled_from([a, b])))
        elif body.get(a) is None and body.get(b) is None and (a in body or b in body or a == "points"):
            if a == "model" and path == "/collections/{name}":
                body["model"] = MODEL
            elif a == "points" and b == "batch" and path.endswith("/points"):
                ids = data.draw(st.lists(real_id, min_size=1, max_size=4, unique=True))
                body["points"] = [{"id": i, "vector": data.draw(vector50), "payload": {"n": i}} for i in ids]
            elif a == "points" and b == "filter" and path.endswith(("/delete", "/payload")):
                body["points"] = data.draw(st.lists(real_id, min_size=1, max_size=4))
    batch = body.get("batch")
    if fix and isinstance(batch, dict) and isinstance(batch.get("ids"), list) and batch["ids"]:
        n = min(len(batch["ids"]), 8)
        batch["ids"] = data.draw(st.lists(real_id, min_size=n, max_size=n, unique=True))
        batch["vectors"] = [data.draw(vector50) for _ in range(n)]
        if isinstance(batch.get("payloads"), list):
            batch["payloads"] = (batch["payloads"] * n)[:n] if batch["payloads"] else None
    steer_filter_keys(data, body)
    if isinstance(body.get("positive"), list) and data.draw(st.booleans()):
        body["positive"] = data.draw(st.lists(real_id, min_size=1, max_size=5))


# ---- the run ------------------------------------------------------------------------------
def seed_unless_random(test):
    return test if SEED == "random" else seed(int(SEED))(test)


def rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))


MAX_GENERATED_ITEMS, MAX_GENERATED_LENGTH = 64, 512
# A fixed seed by default, so that CI runs what passed here; QINCO_FUZZ_SEED=random explores.
SEED = os.environ.get("QINCO_FUZZ_SEED", "20261126")
MAX_RSS_MIB = int(os.environ.get("QINCO_FUZZ_MAX_RSS_MIB", "4000"))
current = {"label": ""}


def watchdog():
    """A generated case that blows up the test process's memory ends the process, not the machine."""
    while True:
        time.sleep(0.5)
        if rss_mib() > 1.5 * MAX_RSS_MIB:
            print(f"\ntest_fuzz: RSS {rss_mib()} MiB while fuzzing {current['label']}; exiting", flush=True)
            os._exit(3)


def bounded_for_generation(spec):
    """Cap array and string sizes in the schema the fuzzer generates from (the server's own limits stay).

    Hypothesis occasionally draws lists near `maxItems` (up to 100,000 points, each with a
    vector), which once took the test process past 6 GiB. Over-limit bodies are tested one by one
    in test_hardening; here we want many small, varied requests.  The responses' schemas keep
    their sizes: they check answers (a search with limit 1000 returns more than 64 hits).
    """
    bounded = capped(spec)
    for name in response_components(spec):
        bounded["components"]["schemas"][name] = spec["components"]["schemas"][name]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if isinstance(operation, dict) and "responses" in operation:
                bounded["paths"][path][method]["responses"] = operation["responses"]
    return bounded


def capped(spec):
    if isinstance(spec, dict):
        out = {k: capped(v) for k, v in spec.items()}
        if isinstance(out.get("maxItems"), int) and out["maxItems"] > MAX_GENERATED_ITEMS:
            out["maxItems"] = max(MAX_GENERATED_ITEMS, out.get("minItems", 0))
        if out.get("type") == "array" and "maxItems" not in out and "items" in out:
            out["maxItems"] = max(MAX_GENERATED_ITEMS, out.get("minItems", 0))
        if isinstance(out.get("maxLength"), int) and out["maxLength"] > MAX_GENERATED_LENGTH:
            out["maxLength"] = max(MAX_GENERATED_LENGTH, out.get("minLength", 0))
        return out
    if isinstance(spec, list):
        return [capped(v) for v in spec]
    return spec


def response_components(spec) -> set[str]:
    """The component schemas that responses refer to, directly or through other components."""
    def refs(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            return ({ref.rsplit("/", 1)[-1]} if ref.startswith("#/components/schemas/") else set()) | \
                set().union(*(refs(v) for v in node.values()))
        if isinstance(node, list):
            return set().union(*(refs(v) for v in node))
        return set()
    todo = refs([op.get("responses", {}) for ops in spec["paths"].values() for op in ops.values()
                 if isinstance(op, dict)])
    found = set()
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo |= refs(spec["components"]["schemas"].get(name, {}))
    return found


def describe(case, response, url) -> str:
    text = response.text if response is not None else ""
    status = response.status_code if response is not None else "no response"
    return f"{case.method.upper()} {case.formatted_path} -> {status} {text[:300]}\n  {case.as_curl_command(base_url=url)}"


def test_schemathesis_every_route_no_5xx_no_schema_violation(live):
    url, proc, log, vectors = live

    def restore():
        """Put the points back when the fuzzer deleted most of them (a delete by a broad filter)."""
        for name, n, payload in (("c", N_C, lambda i: {"n": i, "tag": ["a", "b"][i % 2]}), ("cos", N_COS, lambda i: None)):
            r = httpx.get(f"{url}/collections/{name}/points/count", timeout=60)
            if r.status_code == 200 and r.json()["result"]["count"] < n // 2:
                points = [{"id": i, "vector": vectors[i].tolist(), "payload": payload(i)} for i in range(n)]
                assert httpx.put(f"{url}/collections/{name}/points", json={"points": points},
                                 timeout=60).status_code == 200
    schema = schemathesis.openapi.from_dict(bounded_for_generation(httpx.get(f"{url}/openapi.json").json()))
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    hard = [not_a_server_error, response_schema_conformance] + (
        [status_code_conformance, content_type_conformance] if STRICT else [])
    soft = [] if STRICT else [status_code_conformance, content_type_conformance]
    failures: dict[tuple, str] = {}   # (operation, check, status) -> one reproduction
    notes: dict[tuple, str] = {}
    statuses: dict[str, dict[int, int]] = {}
    samples: dict[tuple, str] = {}  # one answer per operation and status (printed with QINCO_FUZZ_VERBOSE)
    t0 = time.time()

    def record(store, key, case, response):
        store.setdefault(key, describe(case, response, url))

    only = os.environ.get("QINCO_FUZZ_ONLY")
    threading.Thread(target=watchdog, daemon=True).start()
    for op in operations:
        if only and only not in op.label:
            continue
        if os.environ.get("QINCO_FUZZ_VERBOSE"):
            import resource
            print(f"{time.time() - t0:6.1f}s {op.label} (max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB)",
                  flush=True)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @seed_unless_random
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), data=st.data())
            def run(case, data):
                current["label"] = f"{op.label} ({mode.value})"
                if rss_mib() > MAX_RSS_MIB:
                    raise AssertionError(f"the fuzzer's own memory is over {MAX_RSS_MIB} MiB ({current['label']})")
                steer(case, data)
                if proc.poll() is not None:
                    raise AssertionError(f"the server died (exit {proc.returncode}); last case: {describe(case, None, url)}")
                if (case.method.upper(), case.path) == ("DELETE", "/collections/{name}") \
                        and case.path_parameters.get("name") in SCRATCH and data.draw(st.booleans()):
                    httpx.put(f"{url}/collections/{case.path_parameters['name']}", json={"model": MODEL}, timeout=60)
                response = case.call(base_url=url, timeout=60)
                if case.path.endswith("/points/delete") and response.status_code == 200:
                    restore()
                counts = statuses.setdefault(op.label, {})
                counts[response.status_code] = counts.get(response.status_code, 0) + 1
                samples.setdefault((op.label, response.status_code), response.text[:200])
                for checks, store in ((hard, failures), (soft, notes)):
                    for check in checks:
                        try:
                            case.validate_response(response, checks=[check])
                        except (FailureGroup, AssertionError):
                            if check is not_a_server_error:
                                key = (op.label, check.__name__, response.status_code, response.text[:60])
                            else:
                                key = (op.label, check.__name__, response.status_code)
                            record(store, key, case, response)

            try:
                run()
            except Exception as e:  # noqa: BLE001 - an operation with nothing to negate, for instance
                if "server died" in str(e) or "fuzzer's own memory" in str(e):
                    raise
                name = type(e).__name__
                if name not in ("Unsatisfiable", "SkipTest", "Skipped", "FailedHealthCheck"):
                    raise
    elapsed = time.time() - t0
    summary = "\n".join(f"  {label}: {dict(sorted(c.items()))}" for label, c in sorted(statuses.items()))
    print(f"\nschemathesis: {sum(sum(c.values()) for c in statuses.values())} requests in {elapsed:.0f}s\n{summary}")
    if os.environ.get("QINCO_FUZZ_VERBOSE"):
        for key, text in sorted(samples.items(), key=str):
            print(f"  sample {key}: {text}")
    if notes:
        print("informational (status code / content type not documented in the OpenAPI):")
        for key, repro in sorted(notes.items(), key=str):
            print(f"  {key}: {repro.splitlines()[0]}")
    for key, repro in sorted(failures.items(), key=str):
        print(f"FAILURE {key[:3]}:\n  {repro}")
    if failures:
        log = log.lines()
        tracebacks = [i for i, line in enumerate(log) if line.startswith("Traceback")]
        print(f"server log: {len(tracebacks)} tracebacks; the last lines of each distinct one:")
        seen = set()
        for i in tracebacks:
            end = next((j for j in range(i + 1, len(log)) if not log[j].startswith((" ", "Traceback", "\n"))
                        and ":" in log[j]), len(log) - 1)
            if log[end] not in seen:
                seen.add(log[end])
                print("".join(log[max(i, end - 6):end + 1]))
    if only:
        statuses = {}
    # The steering works: (nearly) every route got past its 404/422 at least once.
    never = sorted(label for label, counts in statuses.items() if not any(200 <= s < 300 for s in counts))
    if never:
        print(f"never answered 2xx: {never}")
    assert len(never) <= 0.2 * len(statuses), f"routes that never answered 2xx: {never}"
    assert not failures, "\n".join(f"{k[:3]}:\n  {v}" for k, v in sorted(failures.items(), key=str))
