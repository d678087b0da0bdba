#!/usr/bin/env bash
# Install (idempotent), then train a small 8-byte QINCo model on real GloVe vectors
# for a few minutes and print its validation error next to faiss RQ's.
# (Replaced by `qinco serve` once the service lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p runs
.venv/bin/python -c "from model import datasets as D; import numpy as np; np.save('runs/glove-50-learn.npy', D.load('glove-50').learn)"
exec .venv/bin/qinco train runs/glove-50-learn.npy --bytes 8 --out runs/demo-glove-50-8B.safetensors --max-minutes "${MINUTES:-5}"
