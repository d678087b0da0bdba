#!/usr/bin/env bash
# Create .venv and install the project with its test, data and ray extras.
# torch is pinned: 2.13.0 is the CPU build (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[dev,data,ray]'  # ray: tests/test_ray.py runs --ray on a local cluster
.venv/bin/python -m pip install --quiet -e client
