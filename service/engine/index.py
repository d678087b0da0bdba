"""What a vector space searches, behind one protocol.

  QincoSpaceIndex  QINCo codes in IVF lists (model/index.py's QincoIndex, model/lists.py): the
                   fixed-table shortlist, then neural re-ranking.
  ExactSpaceIndex  the original vectors themselves, searched by brute force (ExactIndex) where
                   they lie, in the space's originals file: what a self-training collection
                   serves until its first model.

The engine adds, removes, searches and reconstructs through SpaceIndex and never asks which one
it holds; the QINCo knobs (nprobe, ef_search, nshort) stay behind `search_params`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import faiss
import numpy as np

from model.index import ExactIndex, QincoIndex, SearchParams
from model.lists import ListStore
from model.network import Encoder, Qinco, encode, split_codes

from .originals import MappedOriginals, OriginalsFile

EXACT_SHORTLIST = 1000  # candidates re-ranked by an `exact` search
HNSW_NEIGHBOURS = 64  # distances per HNSW node visited (faiss's HNSW32: 64 links on layer 0)


@dataclass
class Snapshot:
    """What a snapshot holds of a QINCo index: faiss's quantizer and tables (serialized, lists
    empty) and the lists."""
    faiss: np.ndarray
    lists: ListStore


class SpaceIndex(Protocol):
    model: Qinco | None  # None: the exact index
    exact: bool  # searches and reconstructs the original vectors themselves
    d: int
    code_bytes: int  # bytes per vector in the index (0: exact)
    nlist: int  # IVF lists (0: exact)

    @property
    def ntotal(self) -> int: ...

    @property
    def memory_per_point(self) -> int: ...

    def encode(self, x: np.ndarray, encoder: Encoder, workers: int = 0) -> np.ndarray:
        """What `add` takes for vectors x (the slow part: called outside every lock)."""

    def stored_form(self, encoded: np.ndarray) -> list[bytes]:
        """What the record's `codes` table holds for each encoded vector."""

    def add(self, encoded: np.ndarray, ids: np.ndarray, stored: np.ndarray | None = None) -> None:
        """Upsert: an existing id is replaced.  stored: a mask of the ids that may be stored
        already (None: any may be); the others are new (no look-up for them)."""

    def remove(self, ids) -> int: ...

    def ids(self) -> np.ndarray:
        """Sorted ids of the stored vectors."""

    def reconstruct(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) vectors (zeros where absent) and the mask of the ids found."""

    def search(self, x: np.ndarray, k: int, params: SearchParams | None,
               allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances and ids of the k nearest, ascending (-1: none)."""

    def search_params(self, options: dict) -> SearchParams | None:
        """The parameters for a request's options (nprobe, ef_search, nshort, target_recall, exact)."""

    def search_cost(self, params: SearchParams | None, limit: int) -> int | None:
        """Multiply-adds of one unfiltered query, or None where that cannot be told cheaply."""

    def default_params(self) -> dict: ...

    def serialize(self) -> Snapshot | None:
        """The index as a snapshot stores it, copied now (None: nothing to store, the record holds
        it all)."""


class QincoSpaceIndex:
    exact = False

    def __init__(self, index: QincoIndex):
        self.qinco = index
        self.model, self.d = index.model, index.d
        self.code_bytes, self.nlist = index.code_bytes, index.model.cfg.nlist

    @property
    def ntotal(self) -> int:
        return self.qinco.ntotal

    @property
    def memory_per_point(self) -> int:
        return self.qinco.memory_per_point

    def encode(self, x: np.ndarray, encoder: Encoder, workers: int = 0) -> np.ndarray:
        """(n, 1 + M) int32 codes, IVF list first."""
        codes = encode(self.model, x, encoder, workers=workers).astype(np.int32)
        split_codes(self.model, codes)  # refuses codes the model cannot hold
        return codes

    def stored_form(self, encoded: np.ndarray) -> list[bytes]:
        return [c.tobytes() for c in encoded]

    def add(self, encoded: np.ndarray, ids: np.ndarray, stored: np.ndarray | None = None) -> None:
        self.qinco.add_codes(encoded, ids, stored)

    def remove(self, ids) -> int:
        return self.qinco.remove(ids)

    def ids(self) -> np.ndarray:
        return self.qinco.ids()

    def stored_codes(self) -> tuple[np.ndarray, np.ndarray]:
        return self.qinco.stored_codes()

    def reconstruct(self, ids) -> tuple[np.ndarray, np.ndarray]:
        return self.qinco.reconstruct_many(ids)

    def search(self, x, k, params, allowed_ids=None):
        return self.qinco.search(x, k, params, allowed_ids=allowed_ids)

    def search_params(self, options: dict) -> SearchParams:
        if options.get("target_recall") is not None:
            return self.qinco.params_for_recall(options["target_recall"])
        default = SearchParams.defaults(self.nlist)
        sp = SearchParams(options.get("nprobe") or default.nprobe,
                          options.get("ef_search") or default.ef_search,
                          default.nshort if options.get("nshort") is None else options["nshort"])
        if options.get("exact"):  # every list, a wide shortlist: exact but for the table order
            sp = SearchParams(self.nlist, max(sp.ef_search, self.nlist), max(sp.nshort, EXACT_SHORTLIST))
        return sp

    def search_cost(self, params: SearchParams, limit: int) -> int | None:
        """The HNSW walk, a table per probed list, the codes scanned (lists of average size) and
        the neural decodes.  None: probed lists too small for the results (the search then
        probes every list)."""
        cfg = self.model.cfg
        nshort = max(params.nshort, limit) if params.nshort else 0
        probed = params.nprobe * self.ntotal // cfg.nlist  # codes in the probed lists
        if probed < max(nshort, limit):
            return None
        return (max(params.ef_search, params.nprobe) * HNSW_NEIGHBOURS * cfg.d + params.nprobe * cfg.M * cfg.K
                + probed * cfg.M + nshort * cfg.decode_macs)

    def default_params(self) -> dict:
        return asdict(SearchParams.defaults(self.nlist))

    def serialize(self) -> Snapshot:
        """The quantizer and tables (faiss, its lists empty) and a copy of the lists, made under
        the write lock; written to disk after it."""
        return Snapshot(faiss.serialize_index(self.qinco.index), self.qinco.lists.frozen())


class ExactSpaceIndex:
    """Adds take the rows of the vectors in the originals file (what the write appended), not
    vectors: RAM holds ids and rows, the page cache the vectors."""
    model = None
    exact = True
    code_bytes = 0
    nlist = 0

    def __init__(self, file: OriginalsFile, ids: np.ndarray, rows: np.ndarray, unit_norm: bool):
        """file: the originals file of the record's generation; ids and their rows in it (each id
        once); unit_norm: a cosine space's (its vectors are stored normalised)."""
        self.flat = ExactIndex(file.d, MappedOriginals(file), unit_norm)
        self.flat.add_rows(rows, ids, np.zeros(len(ids), bool))
        self.d = file.d

    @property
    def ntotal(self) -> int:
        return self.flat.ntotal

    @property
    def memory_per_point(self) -> int:
        return self.flat.memory_per_point

    def encode(self, x: np.ndarray, encoder: Encoder, workers: int = 0) -> np.ndarray:
        return x  # its own vectors: nothing to encode (the write appends them to the file)

    def stored_form(self, encoded: np.ndarray) -> list[bytes]:
        return [b""] * len(encoded)  # the record's originals hold them

    def add(self, rows: np.ndarray, ids: np.ndarray, stored: np.ndarray | None = None) -> None:
        """rows: where the write put the vectors in the originals file (writes.put_vectors)."""
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise TypeError(f"the exact index adds rows of the originals file, not {rows.dtype} {rows.shape}")
        self.flat.add_rows(rows, ids, stored)

    def remove(self, ids) -> int:
        return self.flat.remove(ids)

    def ids(self) -> np.ndarray:
        return self.flat.ids()

    def reconstruct(self, ids) -> tuple[np.ndarray, np.ndarray]:
        return self.flat.reconstruct_many(ids)

    def search(self, x, k, params, allowed_ids=None):
        return self.flat.search(x, k, allowed_ids=allowed_ids)

    def search_params(self, options: dict) -> None:
        return None  # exact whatever the options

    def search_cost(self, params, limit: int) -> None:
        return None  # a pass over every vector: never light

    def default_params(self) -> dict:
        return {"exact": True}

    def serialize(self) -> None:
        return None  # the originals in the record are the whole state
