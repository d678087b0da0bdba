"""A regular (non-editable) install of the project and the client, as a user or the Docker image
has it: wheels built from a copy of the source, installed into a fresh venv outside the checkout.

Editable installs (scripts/install.sh, the rest of the suite) import from the source tree and
hide files that a wheel leaves out.  The fresh venv gets its dependencies from the test
environment's site-packages through a .pth path entry (nothing is downloaded); that directory's
own .pth files, the editable installs' among them, are not run from there, so `model`, `service`
and `qinco_client` can only come from the wheels.
"""

import shutil
import site
import subprocess
import sys
from pathlib import Path

from tests.server import ROOT

SKIP = shutil.ignore_patterns(".venv", ".git", "build", "data", "runs", "__pycache__", "*.egg-info",
                              ".pytest_cache", "results")


def build_wheel(project: Path, work: Path) -> Path:
    """`pip wheel --no-deps` of a clean copy of `project` (no stale build/ from earlier builds)."""
    src = work / f"src-{project.name}"
    shutil.copytree(project, src, ignore=SKIP)
    out = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, cwd=work)
    name = "qinco_client" if project.name == "client" else "qinco_search"
    return next(out.glob(f"{name}-*.whl"))


def make_venv(path: Path) -> Path:
    """A venv from the base interpreter, with the test environment's packages as a path entry."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(path)], check=True)
    purelib = Path(subprocess.check_output([str(path / "bin" / "python"), "-c",
                                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    (purelib / "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return path


def install(venv: Path, wheel: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", str(wheel)], check=True)


def regular_install(work: Path) -> Path:
    """The fresh venv holding both wheels; returns its directory (bin/qinco, bin/python)."""
    venv = make_venv(work / "venv")
    for project in (ROOT, ROOT / "client"):
        install(venv, build_wheel(project, work))
    return venv
