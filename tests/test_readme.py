"""The README's curl and Python examples, run as written against a real server with the demo collection."""

import json
import os
import re
import subprocess

import pytest

from tests.server import ROOT, free_port, serve

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def shell_commands() -> list[str]:
    """curl (and the set-up lines before them) from the bash blocks, continuations joined."""
    out = []
    for block in blocks("bash"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("curl", "mkdir")):
                out.append(line)
    return out


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


def test_readme_has_examples():
    assert len(shell_commands()) >= 4 and len(blocks("python")) >= 2


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
    for code in blocks("python"):
        exec(compile(code.replace("127.0.0.1:6343", f"127.0.0.1:{port}"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "queen" in out or "king" in out
