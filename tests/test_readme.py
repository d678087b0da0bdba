"""Every command and code sample of the README, run by a test.

curl and Python examples run as written against a real server with the demo
collection; the `.venv/bin/...` command lines (train, encode, build, tune,
search, eval, data, benchmarks) run in a scratch folder with their time
budgets and sizes scaled down.  `bash scripts/...` is what CI itself runs and
`docker compose` is checked by tests/test_docker.py.
"""

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest

from tests.server import ROOT, free_port, serve

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def command_lines() -> list[str]:
    """Every command of the bash blocks, continuations joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def shell_commands() -> list[str]:
    """curl and the set-up lines before them."""
    return [c for c in command_lines() if c.startswith(("curl", "mkdir"))]


COVERED_ELSEWHERE = ("bash scripts/", "docker compose", "QINCO_API_KEY=secret docker compose")

# The README's budgets and sizes, scaled down so that CI runs every command in seconds.
SCALE_DOWN = [("--max-minutes 60", "--max-vectors 5000"), ("--nlist 1024", "--nlist 16")]
EXTRA_FLAGS = {  # scaled down: LSQ++ starts at a few iterations; of the faiss rows, OPQ and raised LSQ++ left out
    "qinco train": "--lsq-iters 3",
    "train runs/": "--limit 2500",
    "bench/codec.py": "--nt 2000 --nb 500 --nq 100 --lsq-train 500 --encoders fast --faiss RQ,defaults,PLSQ",
    "bench/search.py": "--nt 2000 --nb 1000 --nq 100 --nprobe 1,4 --nshort 0,10",
    "bench/load.py": "--nb 500 --clients 2 --seconds 1",
}


def test_every_readme_command_is_tested():
    for cmd in command_lines():
        assert cmd.startswith(("curl", "mkdir", ".venv/bin/") + COVERED_ELSEWHERE), cmd


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Server with a small demo collection, data in ./data of a scratch working directory."""
    work = tmp_path_factory.mktemp("readme")
    (work / "service").symlink_to(ROOT / "service")
    port = free_port()
    proc = serve(work / "data", port, env={"QINCO_DEMO_POINTS": "3000"})
    yield work, port
    proc.kill()
    proc.wait()


RAG_FRAMEWORKS = ("langchain_qdrant", "llama_index")


def python_examples(rag: bool) -> list[str]:
    """The Python blocks, either those that use a RAG framework's vector store or the others."""
    return [code for code in blocks("python") if any(f in code for f in RAG_FRAMEWORKS) == rag]


def run_python(code: str, port: int) -> None:
    exec(compile(code.replace("127.0.0.1:6343", f"127.0.0.1:{port}"), "README.md", "exec"), {})


def test_readme_has_examples():
    assert len(shell_commands()) >= 4 and len(python_examples(rag=False)) >= 2
    assert [any(f in code for code in python_examples(rag=True)) for f in RAG_FRAMEWORKS] == [True, True]


def test_curl_examples_work_as_written(demo):
    work, port = demo
    for cmd in shell_commands():
        cmd = cmd.replace("localhost:6343", f"127.0.0.1:{port}")
        r = subprocess.run(["bash", "-c", cmd], cwd=work, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (cmd, r.stderr)
        if cmd.startswith("curl"):
            body = json.loads(r.stdout)
            assert body["status"] == "ok", (cmd, body)


def test_python_examples_work_as_written(demo, capsys):
    _, port = demo
    for code in python_examples(rag=False):
        run_python(code, port)
    out = capsys.readouterr().out
    assert "queen" in out or "king" in out


def test_rag_framework_examples_work_as_written(demo, capsys):
    """The "RAG frameworks" examples (LangChain, LlamaIndex): each finds the text its question is about."""
    _, port = demo
    for code in python_examples(rag=True):
        run_python(code, port)
    out = capsys.readouterr().out.splitlines()
    assert "Paris is the capital of France geo" in out  # LangChain: the text and its metadata
    assert any(re.fullmatch(r"0\.\d+ QINCo keeps each vector in 8 bytes", line) for line in out), out  # LlamaIndex


def scaled(cmd: str) -> str:
    for old, new in SCALE_DOWN:
        cmd = cmd.replace(old, new)
    return " ".join([cmd] + [flags for key, flags in EXTRA_FLAGS.items() if key in cmd])


def test_cli_and_benchmark_commands_work_as_written(tmp_path, glove_sample):
    """The README's command lines in order, on a fixture slice and a scaled-down glove-50."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "service").symlink_to(ROOT / "service")
    (tmp_path / "bench").mkdir()  # copies: the benchmarks write their results beside themselves
    for script in (ROOT / "bench").glob("*.py"):
        (tmp_path / "bench" / script.name).write_text(script.read_text())
    for name, rows in {"vectors": slice(0, 400), "learn": slice(0, 2500), "base": slice(4000, 6000),
                       "queries": slice(6000, 6100)}.items():
        np.save(tmp_path / f"{name}.npy", glove_sample[rows])
    env = {**os.environ, "QINCO_CACHE": str(tmp_path / "cache")}
    commands = [c for c in command_lines() if c.startswith(".venv/bin/")]
    assert any("qinco build" in c for c in commands) and any("bench/search.py" in c for c in commands)
    for cmd in commands:
        t0 = time.time()
        r = subprocess.run(["bash", "-c", scaled(cmd)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, (scaled(cmd), r.stdout[-2000:], r.stderr[-3000:])
        print(f"{time.time() - t0:6.1f}s  {scaled(cmd)}")
    assert np.load(tmp_path / "found.npy").shape == (100, 10)
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "bench/results/search-glove-50-8B-10.png").exists()
