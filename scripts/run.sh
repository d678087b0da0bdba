#!/usr/bin/env bash
# Install (idempotent), then start the service on its built-in defaults:
# http://127.0.0.1:6343, data in ./data, and on first start the demo collection
# `glove` (100,000 GloVe words compressed to 8 bytes each).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/qinco serve "$@"
