"""A vector space: the vectors of a collection's points under one model.

It holds the vectors' size and metric, the encoder, the model and its generation, the index
that serves them (engine/index.py), whether originals are kept, and the training lifecycle's
state.  A collection holds one today, named "" (Qdrant's unnamed vector); Qdrant's named
vectors will give it several, each with its own model, index, training and originals.

What changes together is replaced together: a swap sets model, generation, tuning and index
under the write lock and the index lock (engine/lifecycle.py); `job` and `facts` change under
the write lock.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.io import load_model
from model.network import ENCODERS, Qinco, check_vectors

from ..errors import BadRequest
from .index import SpaceIndex


class VectorSpace:
    def __init__(self, folder: Path, meta: dict, generation: int, facts: dict, name: str = ""):
        self.folder, self.name = folder, name
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
        if self.metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if (norms == 0).any():
                raise BadRequest("cosine collections cannot hold or search the zero vector")
            x = x / norms
        return x
