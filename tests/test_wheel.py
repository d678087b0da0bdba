"""The wheels as a user installs them (`pip install .`, a wheel, the Docker image): every package
and the demo model are in them, and `qinco serve` and the client work from a regular install
with nothing imported from the source tree (tests/installed.py)."""

import os
import json
import subprocess

import httpx

from tests.server import ROOT, free_port, start


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def source_packages(*tops: str) -> list[str]:
    """Every Python package of the source tree under these top-level folders."""
    return sorted(".".join(p.parent.relative_to(base).parts)
                  for top, base in ((t, ROOT / "client" if t == "qinco_client" else ROOT) for t in tops)
                  for p in (base / top).rglob("__init__.py") if "__pycache__" not in p.parts)


def test_the_wheels_hold_every_package_and_the_demo_model(regular_install, tmp_path):
    packages = source_packages("model", "service", "qinco_client")
    assert "service.http.routers" in packages and "qinco_client" in packages
    code = ("import importlib, sys, pathlib\n"
            "for name in sys.argv[1:]:\n"
            "    print(pathlib.Path(importlib.import_module(name).__file__).resolve())\n"
            "import service\n"
            "print((pathlib.Path(service.__file__).parent / 'demo' / 'glove-50-ivf-8B.safetensors').stat().st_size)\n")
    out = subprocess.run([str(regular_install / "bin" / "python"), "-c", code, *packages], cwd=tmp_path,
                         env=clean_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    *files, demo_size = out.stdout.split()
    venv = str(regular_install.resolve())
    assert len(files) == len(packages) and all(f.startswith(venv) for f in files), files
    assert int(demo_size) > 100_000


def test_qinco_serve_and_the_client_from_the_wheels(regular_install, tmp_path):
    port = free_port()
    env = clean_env(QINCO_DATA_DIR=str(tmp_path / "data"), QINCO_HOST="127.0.0.1", QINCO_PORT=str(port),
                    QINCO_DEMO_POINTS="2000")
    proc = start([str(regular_install / "bin" / "qinco"), "serve"], port, env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/readyz").status_code == 200
        vector = httpx.post(f"{url}/collections/glove/points", json={"ids": [3], "with_vector": True}
                            ).json()["result"][0]["vector"]
        # The client from its wheel, in the same fresh venv, searches the demo collection.
        code = ("import sys, json, qinco_client\n"
                "assert 'venv' in qinco_client.__file__, qinco_client.__file__\n"
                "with qinco_client.Client(sys.argv[1]) as c:\n"
                "    hits = c.query_points('glove', query=json.loads(sys.argv[2]), limit=5).points\n"
                "print(json.dumps([h.id for h in hits]))\n")
        out = subprocess.run([str(regular_install / "bin" / "python"), "-c", code, url, str(vector)], cwd=tmp_path,
                             env=clean_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        ids = json.loads(out.stdout)
        assert len(ids) == 5 and ids[0] == 3
    finally:
        proc.kill()
        proc.wait()
