"""No Docker engine here: check the files' structure, and run the container's exact command outside
Docker, from a regular install of the wheel as the image has it (tests/installed.py), not the editable one."""

import json
import os
import re
import shutil
import subprocess

import httpx
import yaml

from tests.server import ROOT, free_port, start

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    """Every value of a Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def exec_form(value: str) -> list[str]:
    return json.loads(value)


def test_compose_file_structure():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["qinco"]
    assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
    assert any(v.endswith(":/data") for v in svc["volumes"])
    assert svc["volumes"][0].split(":")[0] in compose["volumes"]
    assert svc["ports"] == ["6343:6343"]
    assert svc["restart"] in ("unless-stopped", "always")
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python" and "/readyz" in test[-1] and "curl" not in " ".join(test)
    assert all(k.startswith("QINCO_") for k in svc["environment"])


def test_dockerfile_runs_as_non_root_with_a_volume_and_a_python_probe():
    user = instruction("USER")[-1]
    assert user not in ("root", "0")
    assert "/data" in instruction("VOLUME")[-1]
    assert "QINCO_DATA_DIR=/data" in " ".join(instruction("ENV"))
    health = instruction("HEALTHCHECK")[-1]
    assert "curl" not in health and "/readyz" in health
    assert exec_form(instruction("CMD")[-1]) == ["qinco", "serve"]


def test_dockerfile_installs_what_the_install_script_installs():
    script = (ROOT / "scripts" / "install.sh").read_text()
    torch_pin = re.search(r"torch==[\d.]+", script).group(0)
    assert torch_pin in DOCKERFILE
    extras = re.search(r"-e '\.\[([^\]]*)\]'", script).group(1).split(",")
    image_extras = re.search(r"'\.\[([^\]]*)\]'", DOCKERFILE).group(1).split(",")
    assert set(image_extras) <= set(extras) and "data" in image_extras


def test_the_container_command_and_healthcheck_outside_docker(tmp_path, regular_install):
    """`qinco serve` with the image's environment (demo included, made small), then the HEALTHCHECK probe,
    both from the regular install's bin/ (the image's PATH is its venv's bin/)."""
    port = free_port()
    env = {"QINCO_DATA_DIR": str(tmp_path / "data"), "QINCO_HOST": "127.0.0.1", "QINCO_PORT": str(port),
           "QINCO_DEMO_POINTS": "2000", "PATH": f"{regular_install / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.update({k: "" for k in ("PYTHONPATH",) if k in os.environ})
    cmd = exec_form(instruction("CMD")[-1])
    assert shutil.which(cmd[0], path=env["PATH"]) == str(regular_install / "bin" / cmd[0])
    proc = start(cmd, port, env, cwd=tmp_path)
    try:
        probe = exec_form(instruction("HEALTHCHECK")[-1].split("CMD", 1)[1].strip())
        assert shutil.which(probe[0], path=env["PATH"]) == str(regular_install / "bin" / probe[0])
        r = subprocess.run(probe, env={**os.environ, **env}, cwd=tmp_path, timeout=30)
        assert r.returncode == 0
        url = f"http://127.0.0.1:{port}"
        info = httpx.get(f"{url}/collections/glove").json()["result"]
        assert info["points_count"] == 2000 and info["metric"] == "cosine"
        hits = httpx.post(f"{url}/collections/glove/points/recommend", json={"positive": [1], "limit": 5, "with_payload": True}).json()
        assert len(hits["result"]) == 5 and all("word" in h["payload"] for h in hits["result"])
    finally:
        proc.kill()
        proc.wait()
