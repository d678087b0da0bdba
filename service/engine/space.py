"""A vector space: the vectors of a collection's points under one model; Qdrant's named vectors.

It holds the vectors' name, size and metric, the encoder, the model and its generation, the
index that serves them (engine/index.py), its tables in the record (record.SpaceRecord),
whether originals are kept, and the training lifecycle's state, job (lifecycle.py) and refine
queue (refine.py).  A collection holds one or several, in the order of collection.json's
`vectors`; Qdrant's unnamed vector is the one named "".  Space k keeps its files (models,
tuning, jobs) in <collection>/vectors/<k>, space 0 in the collection's folder (where collections
made before named vectors have them).

What changes together is replaced together: a swap sets model, generation, tuning and index
under the write lock and the index lock (engine/lifecycle.py); `job` and `facts` change under
the write lock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.io import load_model
from model.network import ENCODERS, Qinco, check_vectors

from ..errors import BadRequest
from .index import SpaceIndex
from .space_record import SpaceRecord

if TYPE_CHECKING:  # annotations only
    from .lifecycle import Trainer
    from .refine import Refiner

MAX_SPACES = 16  # named vectors per collection: each has its own model, index, queue and jobs


def space_metas(meta: dict) -> list[dict]:
    """A collection's vector spaces from its collection.json: `vectors`, or the one unnamed
    space of a collection made before named vectors (its settings at the top level)."""
    if "vectors" in meta:
        return meta["vectors"]
    return [{"name": "", **{k: meta[k] for k in ("metric", "encoder", "size", "qinco") if k in meta}}]


def space_folder(collection_folder: Path, k: int) -> Path:
    return collection_folder if k == 0 else collection_folder / "vectors" / str(k)


class VectorSpace:
    def __init__(self, collection_folder: Path, meta: dict, k: int, record: SpaceRecord):
        self.k, self.name, self.record = k, meta["name"], record
        self.folder = folder = space_folder(collection_folder, k)
        folder.mkdir(parents=True, exist_ok=True)
        generation, facts = record.generation(), record.facts()
        self.metric = meta["metric"]
        self.encoder_name = meta["encoder"]
        self.encoder = ENCODERS[self.encoder_name]
        self.size: int | None = meta.get("size")  # of a self-training collection
        self.settings: dict | None = meta.get("qinco")  # self-training settings; None: created from a model
        self.generation = generation
        self.model: Qinco | None = self._load_model()
        self.remove_stale_models()  # only once the current one has loaded
        tuning = folder / "tuning.json"
        self.tuning = json.loads(tuning.read_text()) if tuning.exists() and generation == 0 else {}
        self.facts = facts  # the record's training facts: job, last_error, paused, model (its figures)
        self.job = None  # the running training job (service/training/job.py)
        self.index: SpaceIndex  # set by the recovery (engine/snapshots.py)
        self.trainer: Trainer  # set by the collection, once the index is recovered
        self.refiner: Refiner

    def _load_model(self) -> Qinco | None:
        path = self.model_path(self.generation)
        if self.settings is not None and not path.exists() and self.generation == 0:
            return None  # collecting: exact search over the originals
        return load_model(path)

    def model_path(self, generation: int) -> Path:
        return self.folder / ("model.safetensors" if generation == 0 else f"model-{generation}.safetensors")

    def remove_stale_models(self):
        """Model files of other generations: superseded ones, or a swap that did not commit."""
        keep = self.model_path(self.generation)
        for path in [self.folder / "model.safetensors", *self.folder.glob("model-*.safetensors")]:
            if path != keep:
                path.unlink(missing_ok=True)

    @property
    def dimension(self) -> int:
        return self.index.d

    @property
    def label(self) -> str:
        """How messages name it."""
        return "the unnamed vector" if self.name == "" else f"vector {self.name!r}"

    @property
    def collecting(self) -> bool:
        """A self-training space before its first model: it serves its originals exactly."""
        return self.model is None

    @property
    def keeps_originals(self) -> bool:
        """Whether writes store original vectors: a self-training space that keeps them, or
        needs them until its first model or while a job trains the next."""
        return self.settings is not None and (self.settings["keep_originals"] or self.collecting
                                              or self.job is not None)

    def prepare(self, vectors) -> np.ndarray:
        """Vectors checked against the space's size, normalised for cosine."""
        try:
            x = check_vectors(vectors, self.dimension)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if self.metric == "cosine":  # in float64: float32 squares overflow or vanish at extreme values
            norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
            if (norms == 0).any():
                raise BadRequest("cosine collections cannot hold or search the zero vector")
            x = (x / norms).astype(np.float32)  # every stored vector has norm 1 (the exact index relies on it)
        return x
