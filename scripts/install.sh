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
# Debian's chromium for tests/test_docs.py (/docs rendered offline); as root with apt-get only, else that test skips.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
        || echo "install.sh: chromium could not be installed; the offline-docs browser test will be skipped" >&2
fi
