"""Start a real `qinco serve` process for tests."""

import os
import socket
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict | None = None, timeout: float = 180, cwd: Path = ROOT
          ) -> subprocess.Popen:
    """The server's log goes to a temporary file (a pipe nobody reads would block it once full)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})})
    proc.log = log
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not become ready")


def serve(data_dir: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--data-dir", str(data_dir), "--port", str(port), *extra]
    return start(cmd, port, env)


def wait_green(client, name: str, timeout: float = 60):
    """With a qdrant-client, as a Qdrant user waits for optimisation: here, for the points
    acknowledged with `fast` codes to get the collection encoder's (fast ingest), so that
    rankings no longer move."""
    deadline = time.time() + timeout
    while (status := client.get_collection(name).status) != "green":
        assert time.time() < deadline, status
        time.sleep(0.05)
