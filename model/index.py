"""The IVF-HNSW search index: fixed-table shortlist, neural re-ranking.

Layout: a faiss `IVF{nlist}_HNSW32,RQ{M}x8_Nqint8` index whose HNSW coarse
quantizer holds the model's centroids and whose RQ codebooks are the model's
fixed tables; its own inverted lists stay empty.  Vectors are encoded once by
QINCo, and their codes (M bytes and faiss's norm byte) and ids are held once,
in our lists (model/lists.py), which the scan reads.

Search: HNSW finds `nprobe` lists (`ef_search`) -> their codes are scored with
the tables, one look-up table per query (model/scan.py; faiss's own scanner
rebuilds one per probed list) -> the `nshort` best, with their codes -> QINCo
decodes the shortlist -> exact L2 to the query -> top k.

An index directory holds index.faiss (the quantizer and tables), lists.npz (codes
and ids), model.safetensors (with the tables), tuning.json and manifest.json
(format, sizes, checksums).  Saving is atomic; loading checks the manifest and
never unpickles.  Format 1 kept the codes in index.faiss: it loads too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from .io import CheckpointError, load_model, save_model, sha256
from .network import ENCODERS, Encoder, Qinco, check_vectors, decode, encode, split_codes
from .lists import ListStore, is_in_sorted
from .scan import list_terms, native_bf16, norm_of_byte, query_tables, scan, scan_tables, warm_up

FORMAT = "qinco-search/index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_K = 10_000
MAX_NSHORT = 100_000
SCAN_BATCH = 2048  # queries per look-up-table block: (batch, M, K) float32
RERANK_BLOCK = 65_536  # shortlisted candidates decoded at once
FILTER_EXACT = 256  # a filter letting at most this many vectors through ranks them all exactly
EXACT_BLOCK = 16_384  # rows of originals scored at once by an exact search


@dataclass(frozen=True)
class SearchParams:
    nprobe: int = 16
    ef_search: int = 64
    nshort: int = 20  # shortlist re-ranked by the neural decoder; 0: none, the fixed-table order

    @classmethod
    def defaults(cls, nlist: int) -> SearchParams:
        """The default operating point for nlist lists: nprobe = 2 sqrt(nlist), at least 16 (32
        at 256 lists, 64 at 1,024, 200 at 10,000).  Finer lists hold fewer of a query's neighbours
        each, so a search probes more of them, but a smaller share."""
        nprobe = min(nlist, max(cls.nprobe, round(2 * math.sqrt(nlist))))
        return cls(nprobe, max(cls.ef_search, nprobe), cls.nshort)


@dataclass(frozen=True)
class OperatingPoint:
    params: SearchParams
    recall: float  # recall@k of the tuning queries, k as tuned
    ms_per_query: float


class QincoIndexError(ValueError):
    """A bad request to the index (wrong shape, bad parameter) or a damaged index directory."""


def make_faiss_index(model: Qinco) -> faiss.IndexIVFResidualQuantizer:
    """An empty IVF-HNSW-RQ index holding the model's centroids and fixed tables."""
    cfg = model.cfg
    if not cfg.nlist:
        raise QincoIndexError("an index needs an IVF model (train with --nlist)")
    if cfg.K != 256:
        raise QincoIndexError(f"an index needs K = 256 (one byte per step), got K = {cfg.K}")
    if float(model.norm_range[1]) <= 0:
        raise QincoIndexError("the model has no fitted tables (it was not trained by `qinco train --nlist`)")
    index = faiss.index_factory(cfg.d, f"IVF{cfg.nlist}_HNSW32,RQ{cfg.M}x8_Nqint8")
    quantizer = faiss.downcast_index(index.quantizer)
    quantizer.add(model.centroids_raw())
    rq = index.rq
    faiss.copy_array_to_vector(model.tables.numpy().astype(np.float32).ravel(), rq.codebooks)
    rq.is_trained = True
    lo, hi = (float(v) for v in model.norm_range)
    norms = np.array([lo, hi], dtype=np.float32)
    rq.train_norm(2, faiss.swig_ptr(norms))
    index.is_trained = True
    return index


class QincoIndex:
    """A QINCo model and its IVF-HNSW index, searched with neural re-ranking."""

    def __init__(self, model: Qinco, index: faiss.IndexIVFResidualQuantizer | None = None,
                 tuning: dict | None = None, bf16: bool | None = None, lists: ListStore | None = None):
        """index: the faiss index of the quantizer and tables (a format-1 one with codes in its
        lists: they move to ours); lists: the codes and ids (default: none, or those)."""
        self.model = model.eval()
        self.index = index if index is not None else make_faiss_index(model)
        if lists is None:
            lists = ListStore.from_faiss(self.index.invlists) if self.index.ntotal else \
                ListStore(model.cfg.nlist, self.index.code_size)
        if self.index.ntotal:
            self.index.reset()  # its lists are ours now: held once
        self.lists = lists
        self.tuning = tuning or {}  # {"k": int, "points": [OperatingPoint as dict]}
        self.code_bytes = self.index.code_size
        # The scan's constants come from the faiss index itself, so that its distances are faiss's.
        cfg, rq = model.cfg, self.index.rq
        if rq.search_type != faiss.AdditiveQuantizer.ST_norm_qint8 or self.code_bytes != cfg.M + 1:
            raise QincoIndexError("the index must be IVF{nlist}_HNSW32,RQ{M}x8_Nqint8 (M code bytes, then the norm)")
        self.tables = faiss.vector_to_array(rq.codebooks).reshape(cfg.M, cfg.K, cfg.d)
        # bf16 query tables where the CPU multiplies bf16 (None); True forces them (emulated: tests).
        self.scan_tables = scan_tables(self.tables, bf16=native_bf16() if bf16 is None else bf16)
        centroids = self.index.quantizer.reconstruct_n(0, cfg.nlist)
        try:
            self.list_terms = list_terms(centroids, self.tables)  # 2 * nlist * M * K bytes
        except ValueError as e:
            raise QincoIndexError(f"the model's IVF step cannot be scanned: {e}") from e
        self.norms = norm_of_byte(rq.norm_min, rq.norm_max)
        self._sorted_ids: tuple[int, np.ndarray] | None = None  # (lists.version, ids())
        warm_up()  # compile the scan here, not in (and timed with) the first search

    @property
    def d(self) -> int:
        return self.model.cfg.d

    @property
    def memory_per_point(self) -> int:
        """Bytes of RAM per stored vector in the lists: its code and its 8-byte id (plus the
        lists' unused room, below a quarter: see ListStore.compact)."""
        return self.code_bytes + 8

    @property
    def ntotal(self) -> int:
        return self.lists.ntotal

    # ---- writing -----------------------------------------------------------------
    def encode(self, x, encoder: Encoder = ENCODERS["balanced"], progress=None, device="cpu") -> np.ndarray:
        """Raw vectors -> (n, 1 + M) int32 codes, IVF list first (the slow part: no lock needed)."""
        return encode(self.model, x, encoder, progress=progress, device=device)

    def add(self, x, ids=None, encoder: Encoder = ENCODERS["balanced"], progress=None) -> np.ndarray:
        """Encode and add vectors; existing ids are replaced.  Returns the ids."""
        x = check_vectors(x, self.d)
        ids = self._check_ids(ids if ids is not None else np.arange(self.ntotal, self.ntotal + len(x)), len(x))
        self.add_codes(self.encode(x, encoder, progress), ids)
        return ids

    def add_codes(self, codes: np.ndarray, ids, stored: np.ndarray | None = None) -> None:
        """Write precomputed codes into the lists (upsert: an existing id is replaced).
        stored: a mask of the ids that may be stored already (None: any may be); the others
        are new, and no list is searched for them."""
        qcodes, lists = split_codes(self.model, codes)
        if qcodes.shape[1] != self.model.cfg.M:
            raise QincoIndexError(f"codes must hold all {self.model.cfg.M} steps, got {qcodes.shape[1]}")
        ids = self._check_ids(ids, len(qcodes))
        lists = lists.numpy()
        old = ids if stored is None else ids[stored]
        if len(old):
            self.lists.remove(old, lists if stored is None else lists[stored])
        self.lists.add(lists, self._pack(qcodes.numpy()), ids)
        self.lists.compact()

    def _pack(self, qcodes: np.ndarray) -> np.ndarray:
        """faiss's packed RQ codes: M bytes, then the norm byte."""
        n = len(qcodes)
        packed = np.zeros((n, self.code_bytes), dtype=np.uint8)
        codes32 = np.ascontiguousarray(qcodes, dtype=np.int32)
        # faiss computes the norm ||r̂||² of the table reconstruction of the residual, as its
        # IVF scanner expects (a centroid-inclusive norm skews every distance).
        self.index.rq.pack_codes(n, faiss.swig_ptr(codes32), faiss.swig_ptr(packed), -1, None, None)
        return packed

    def remove(self, ids) -> int:
        """Remove ids (absent ones are ignored); returns how many were removed."""
        ids = np.unique(self._check_ids(ids, None, unique=False))
        removed = self.lists.remove(ids)
        if removed:
            self.lists.compact()
        return removed

    def ids(self) -> np.ndarray:
        """Sorted ids of the stored vectors (computed once per version of the lists)."""
        if self._sorted_ids is None or self._sorted_ids[0] != self.lists.version:
            self._sorted_ids = (self.lists.version, np.sort(self.lists.stored()[2]))
        return self._sorted_ids[1]

    def stored_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """ids (ntotal,) and QINCo codes (ntotal, 1 + M), list first, of every stored vector."""
        rows, list_nos, ids = self.lists.stored()
        return ids, self._qinco_codes(rows, list_nos)

    def _qinco_codes(self, rows: np.ndarray, list_nos: np.ndarray) -> np.ndarray:
        """(n, 1 + M) int64 QINCo codes of rows of the lists, the list number first."""
        return np.hstack([list_nos[:, None], self.lists.codes[rows, :self.model.cfg.M]]).astype(np.int64)

    def reconstruct(self, i: int) -> np.ndarray:
        """The neural decoding of a stored vector (d,)."""
        vectors, found = self.reconstruct_many([i])
        if not found[0]:
            raise KeyError(f"id {i} is not in the index")
        return vectors[0]

    def reconstruct_many(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Neural decodings of stored vectors, decoded together: (n, d) float32 (zeros where
        absent) and a bool mask (n,) of the ids found."""
        rows = self.lists.find(np.asarray([int(i) for i in ids], dtype=np.int64))
        found = rows >= 0
        vectors = np.zeros((len(rows), self.d), dtype=np.float32)
        if found.any():
            codes = self._qinco_codes(rows[found], self.lists.list_of_rows(rows[found]))
            vectors[found] = decode(self.model, codes)
        return vectors, found

    @staticmethod
    def _check_ids(ids, n: int | None, unique: bool = True) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (n is not None and len(ids) != n):
            raise QincoIndexError(f"ids must be a 1-D array of {n} integers, got shape {ids.shape}")
        if len(ids) and not np.issubdtype(ids.dtype, np.integer):
            raise QincoIndexError(f"ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if len(ids) and ids.min() < 0:
            raise QincoIndexError("ids must be >= 0")
        if unique and len(np.unique(ids)) != len(ids):
            raise QincoIndexError("duplicate ids in one batch")
        return ids

    # ---- searching ---------------------------------------------------------------
    def check_params(self, k: int, params: SearchParams) -> SearchParams:
        nlist = self.model.cfg.nlist
        if not 1 <= k <= MAX_K:
            raise QincoIndexError(f"k must be between 1 and {MAX_K}, got {k}")
        if not 1 <= params.nprobe <= nlist:
            raise QincoIndexError(f"nprobe must be between 1 and nlist={nlist}, got {params.nprobe}")
        if params.ef_search < 1:
            raise QincoIndexError(f"ef_search must be >= 1, got {params.ef_search}")
        if not 0 <= params.nshort <= MAX_NSHORT:
            raise QincoIndexError(f"nshort must be between 0 and {MAX_NSHORT}, got {params.nshort}")
        # HNSW must return nprobe lists, and a re-ranked shortlist must hold k candidates.
        nshort = max(params.nshort, k) if params.nshort else 0
        return SearchParams(params.nprobe, max(params.ef_search, params.nprobe), nshort)

    def shortlist(self, xq: np.ndarray, n: int, params: SearchParams,
                  allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fixed-table scoring of the probed lists: the n best as distances and ids (nq, n),
        ascending, and their codes (nq, n, 1 + M); inf, -1 and zero codes past the last found.

        allowed: a bool mask over the rows of the lists (a filter), or None for every row."""
        lists = self.lists
        M = self.model.cfg.M
        D = np.empty((len(xq), n), dtype=np.float32)
        I = np.full((len(xq), n), -1, dtype=np.int64)
        codes = np.zeros((len(xq), n, 1 + M), dtype=np.int64)
        hnsw = faiss.SearchParametersHNSW(efSearch=params.ef_search)
        for q0 in range(0, len(xq), SCAN_BATCH):
            block = slice(q0, q0 + SCAN_BATCH)
            coarse_dis, probes = self.index.quantizer.search(xq[block], params.nprobe, params=hnsw)
            D[block], rows = scan(query_tables(xq[block], self.scan_tables, M), coarse_dis, probes,
                                  self.list_terms, self.norms, lists, n, allowed)
            found = rows >= 0
            I[block][found] = lists.ids[rows[found]]
            codes[block][found] = self._qinco_codes(rows[found], lists.list_of_rows(rows[found]))
        return D, I, codes

    def search(self, queries, k: int = 10, params: SearchParams | None = None,
               target_recall: float | None = None, allowed_ids: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest neighbours: distances (nq, k') float32 and ids (nq, k') int64.

        k' = min(k, ntotal): every row holds k' real results and no -1 padding.
        When the probed lists hold fewer than k' vectors for a query, that query
        is searched again over every list.  `nshort=0` skips the neural re-ranking:
        the fixed-table order and distances (the approximate decoder alone).

        allowed_ids (a filter): only these ids may be returned, and k' = min(k, how many
        of them are stored).  Other vectors never take a shortlist place; nprobe grows as
        the filter narrows (the probed lists should hold as many allowed vectors as an
        unfiltered search sees), and when at most max(nshort, FILTER_EXACT) are allowed,
        all of them are decoded and ranked exactly.
        """
        if target_recall is not None:
            params = self.params_for_recall(target_recall)
        params = self.check_params(k, params or SearchParams.defaults(self.model.cfg.nlist))
        xq = check_vectors(queries, self.d, "queries")
        mask, n_allowed = None, self.ntotal
        if allowed_ids is not None:  # over the rows in use: holes and room hold id -1, never allowed
            mask = rows_of_ids(self.lists.ids[:self.lists.end], allowed_ids)
            n_allowed = int(mask.sum())
            params = self.filtered_params(params, n_allowed, self.ntotal, k)
        kk = min(k, n_allowed)
        if kk == 0:
            return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
        D, I, codes = self.shortlist(xq, params.nshort or kk, params, mask)
        short = (I >= 0).sum(1) < kk
        if short.any():  # too few vectors in the probed lists: probe them all
            nlist = self.model.cfg.nlist
            wide = SearchParams(nlist, max(params.ef_search, nlist), params.nshort)
            D[short], I[short], codes[short] = self.shortlist(xq[short], params.nshort or kk, wide, mask)
        if params.nshort:
            D = self.rerank_distances(xq, I, codes)
        order = np.argsort(D, axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(D, order, 1).astype(np.float32), np.take_along_axis(I, order, 1)

    def filtered_params(self, params: SearchParams, n_allowed: int, ntotal: int, k: int) -> SearchParams:
        """Search parameters for a filter that lets n_allowed of ntotal vectors through."""
        nlist = self.model.cfg.nlist
        if n_allowed <= max(params.nshort, FILTER_EXACT):  # few: decode and rank every one of them
            return SearchParams(nlist, max(params.ef_search, nlist), max(n_allowed, k, 1))
        nprobe = min(nlist, math.ceil(params.nprobe * ntotal / max(n_allowed, 1)))
        return SearchParams(nprobe, max(params.ef_search, nprobe), params.nshort)

    def rerank_distances(self, xq: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Exact L2 from each query to the neural decoding of its shortlist; +inf where empty."""
        nq, ns, _ = codes.shape
        out = np.full((nq, ns), np.inf, dtype=np.float32)
        step = max(1, RERANK_BLOCK // max(ns, 1))  # queries per block: memory stays flat on big batches
        for q0 in range(0, nq, step):
            block = slice(q0, q0 + step)
            valid = ids[block] >= 0
            if valid.any():
                xhat = decode(self.model, codes[block][valid])
                q = np.broadcast_to(xq[block, None, :], (len(valid), ns, self.d))[valid]
                out[block][valid] = ((q - xhat) ** 2).sum(-1)
        return out

    # ---- tuning ------------------------------------------------------------------
    def tune(self, queries, ground_truth: np.ndarray, k: int = 10, grid: dict | None = None) -> list[OperatingPoint]:
        """Sweep search parameters on held-out queries; keep and return the Pareto front.

        ground_truth (nq, >= 1): the true nearest neighbour ids.  Recall is
        recall@k: the true nearest neighbour is among the k results.
        """
        xq = check_vectors(queries, self.d, "queries")
        gt = np.asarray(ground_truth)[:, 0]
        nlist = self.model.cfg.nlist
        grid = grid or {}
        nprobes = grid.get("nprobe") or sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist})
        nshorts = grid.get("nshort") or [s for s in (0, k, 2 * k, 5 * k, 10 * k, 20 * k, 50 * k) if s <= MAX_NSHORT]
        points = []
        for nprobe in nprobes:
            for nshort in nshorts:
                params = SearchParams(nprobe, max(32, 2 * nprobe), nshort)
                t0 = time.perf_counter()
                _, ids = self.search(xq, k, params)
                ms = (time.perf_counter() - t0) * 1000 / len(xq)
                recall = float((ids == gt[:, None]).any(1).mean())
                points.append(OperatingPoint(params, recall, ms))
        front = pareto_front(points)
        self.tuning = {"k": k, "points": [asdict(p) for p in front]}
        return front

    def params_for_recall(self, target: float) -> SearchParams:
        """The fastest tuned operating point reaching `target`, else the most accurate one."""
        if not 0 < target <= 1:
            raise QincoIndexError(f"target_recall must be in (0, 1], got {target}")
        points = self.tuning.get("points")
        if not points:
            raise QincoIndexError("this index has not been tuned: run `qinco tune` or pass search parameters")
        ok = [p for p in points if p["recall"] >= target]
        best = min(ok, key=lambda p: p["ms_per_query"]) if ok else max(points, key=lambda p: p["recall"])
        return SearchParams(**best["params"])

    # ---- persistence ---------------------------------------------------------------
    def save(self, path) -> None:
        """Write the index directory atomically: a temporary sibling, then renames."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        faiss.write_index(self.index, str(tmp / "index.faiss"))
        self.lists.save(tmp / "lists.npz")
        save_model(self.model, tmp / "model.safetensors")
        (tmp / "tuning.json").write_text(json.dumps(self.tuning, indent=1))
        files = ("index.faiss", "lists.npz", "model.safetensors", "tuning.json")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "d": self.d,
                    "M": self.model.cfg.M, "nlist": self.model.cfg.nlist, "ntotal": self.ntotal,
                    "bytes_per_vector": self.code_bytes, "sha256": {f: sha256(tmp / f) for f in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for f in list(files) + ["manifest.json"]:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, path) -> "QincoIndex":
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise QincoIndexError(f"{path}: not an index directory (no manifest.json)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise QincoIndexError(f"{path}: damaged manifest ({e})") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
            raise QincoIndexError(f"{path}: unsupported index format {manifest.get('format')!r} "
                              f"version {manifest.get('format_version')!r}")
        for name, digest in manifest.get("sha256", {}).items():
            if not (path / name).is_file() or sha256(path / name) != digest:
                raise QincoIndexError(f"{path}: {name} is missing or does not match its checksum")
        try:
            model = load_model(path / "model.safetensors")
        except CheckpointError as e:
            raise QincoIndexError(str(e)) from None
        index = faiss.read_index(str(path / "index.faiss"))
        if not isinstance(index, faiss.IndexIVFResidualQuantizer):
            raise QincoIndexError(f"{path}: index.faiss is not an IVF-RQ index")
        lists = None
        if manifest["format_version"] >= 2:
            try:
                lists = ListStore.load(path / "lists.npz", model.cfg.nlist, index.code_size)
            except (ValueError, KeyError, OSError) as e:
                raise QincoIndexError(f"{path}: lists.npz cannot be read ({e})") from None
        n = index.ntotal if lists is None else lists.ntotal
        if not isinstance(index, faiss.IndexIVFResidualQuantizer) or n != manifest["ntotal"] or index.d != model.cfg.d:
            raise QincoIndexError(f"{path}: the index does not match the manifest")
        return cls(model, index, json.loads((path / "tuning.json").read_text()), lists=lists)


def rows_of_ids(ids: np.ndarray, allowed_ids: np.ndarray) -> np.ndarray:
    """Bool mask over `ids` (n,): which are among `allowed_ids` (any order, duplicates fine)."""
    return is_in_sorted(ids, np.unique(np.asarray(allowed_ids, dtype=np.int64)))


def pareto_front(points: list[OperatingPoint]) -> list[OperatingPoint]:
    """Points that no other point beats on both recall and time, by increasing time."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p.ms_per_query, -p.recall)):
        if p.recall > best:
            front.append(p)
            best = p.recall
    return front


class VectorRows:
    """Vectors held in memory, appended as rows: an `ExactIndex`'s source when no file holds them
    (tests, tools).  Append-only: a replaced or removed vector's row stays."""

    def __init__(self, d: int):
        self.d = d
        self._x = np.zeros((0, d), dtype=np.float32)
        self._n = 0

    def append(self, x: np.ndarray) -> np.ndarray:
        """Rows of the vectors appended (grown by doubling: amortised O(1) a row)."""
        need = self._n + len(x)
        if need > len(self._x):
            grown = np.zeros((max(need, 2 * len(self._x), 1024), self.d), np.float32)
            grown[:self._n] = self._x[:self._n]
            self._x = grown
        self._x[self._n:need] = x
        rows = np.arange(self._n, need, dtype=np.int64)
        self._n = need
        return rows

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self._x[np.asarray(rows, dtype=np.int64)]

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self._x[start:stop]


class ExactIndex:
    """Vectors searched by brute force: what a collection serves before it has a model.

    Same search interface as QincoIndex (squared L2, ascending).  The index holds ids and the
    rows of their vectors in `source` (anything with `read(rows) -> (n, d) float32` and
    `read_range(start, stop)`: the
    collection's originals file (`MappedOriginals`), or `VectorRows`), 16 bytes a point, no object
    per point; a removal moves the last entry into the hole.  Ids are found through a sorted
    copy of them, made when a read or a removal needs it after a change (O(n log n): ~0.1 s at
    1M random ids); a write of new ids (`stored` all false) needs none.  Searches read the
    vectors in blocks of EXACT_BLOCK rows, so a search's memory stays flat.
    """

    code_bytes = 0
    model = None

    def __init__(self, d: int, source=None, unit_norm: bool = False):
        """unit_norm: every vector has norm 1 (a cosine space's): a search skips their norms, half
        of what it reads."""
        self.d, self.unit_norm = d, unit_norm
        self.source = VectorRows(d) if source is None else source
        self._rows = np.zeros(0, dtype=np.int64)
        self._ids = np.zeros(0, dtype=np.int64)
        self._n = 0
        self._by_id: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, their entries)

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def memory_per_point(self) -> int:
        """Bytes of RAM per stored vector: its id and row, and the sorted copy of the ids with
        their entries (there after any read or removal by id); the vectors are the source's."""
        return 8 + 8 + 16

    def add_vectors(self, x: np.ndarray, ids, stored: np.ndarray | None = None) -> None:
        """Upsert vectors, appended to the source (a `VectorRows`)."""
        x = check_vectors(x, self.d)
        ids = QincoIndex._check_ids(ids, len(x))
        self.add_rows(self.source.append(x), ids, stored)

    def add_rows(self, rows: np.ndarray, ids, stored: np.ndarray | None = None) -> None:
        """Upsert: the vector of ids[i] is the source's row rows[i]; an existing id is replaced.
        `stored`: which of `ids` may be stored already (None: any); the others need no look-up."""
        ids = QincoIndex._check_ids(ids, len(rows))
        if stored is None or stored.any():
            self.remove(ids if stored is None else ids[stored])
        need = self._n + len(ids)
        if need > len(self._ids):  # grow by doubling: amortised O(1) per entry
            size = max(need, 2 * len(self._ids), 1024)
            self._rows = np.concatenate([self._rows[:self._n], np.zeros(size - self._n, np.int64)])
            self._ids = np.concatenate([self._ids[:self._n], np.zeros(size - self._n, np.int64)])
        self._rows[self._n:need], self._ids[self._n:need] = rows, ids
        self._n, self._by_id = need, None

    def _entries_of(self, ids) -> np.ndarray:
        """The entry of each id (-1: not stored)."""
        if self._by_id is None:
            order = np.argsort(self._ids[:self._n], kind="stable")
            self._by_id = (self._ids[:self._n][order], order)
        keys, entries = self._by_id
        ids = np.asarray(ids, dtype=np.int64)
        if not len(keys):
            return np.full(len(ids), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        return np.where(keys[at] == ids, entries[at], -1)

    def remove(self, ids) -> int:
        entries = np.unique(self._entries_of(ids))
        entries = entries[entries >= 0]
        for e in entries[::-1].tolist():  # the highest first: the last entry moved in is never one to remove
            last = self._n - 1
            if e != last:
                self._rows[e], self._ids[e] = self._rows[last], self._ids[last]
            self._n = last
        if len(entries):
            self._by_id = None
        return len(entries)

    def ids(self) -> np.ndarray:
        if self._by_id is None:
            self._entries_of([])
        return self._by_id[0]

    def reconstruct_many(self, ids) -> tuple[np.ndarray, np.ndarray]:
        entries = self._entries_of(ids)
        found = entries >= 0
        vectors = np.zeros((len(entries), self.d), dtype=np.float32)
        vectors[found] = self.source.read(self._rows[entries[found]])
        return vectors, found

    def _block(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of these rows: a view of the source where the rows follow one another (as
        appends leave them), not a copy."""
        return self.source.read_range(int(rows[0]), int(rows[-1]) + 1) if _consecutive(rows) else self.source.read(rows)

    def search(self, queries, k: int = 10, params=None, target_recall=None, allowed_ids=None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest neighbours (params and target_recall do not apply)."""
        if not 1 <= k <= MAX_K:
            raise QincoIndexError(f"k must be between 1 and {MAX_K}, got {k}")
        xq = check_vectors(queries, self.d, "queries")
        n = self._n
        mask = rows_of_ids(self._ids[:n], allowed_ids) if allowed_ids is not None else None
        kk = min(k, n if mask is None else int(mask.sum()))
        D = np.full((len(xq), kk), np.inf, dtype=np.float32)
        I = np.full((len(xq), kk), -1, dtype=np.int64)
        if kk == 0:
            return D, I
        step = 64  # queries per block: (64, EXACT_BLOCK) distances, ~25 MB of temporaries
        q_norms = (xq ** 2).sum(1, keepdims=True)
        for r0 in range(0, n, EXACT_BLOCK):  # each block of vectors read once, for every query
            r1 = min(n, r0 + EXACT_BLOCK)
            if mask is not None and not mask[r0:r1].any():
                continue
            block = self._block(self._rows[r0:r1])
            b_norms = 1.0 if self.unit_norm else np.einsum("ij,ij->i", block, block)[None]  # no (b, d) temporary
            for q0 in range(0, len(xq), step):
                q = slice(q0, q0 + step)
                dist = q_norms[q] - 2 * xq[q] @ block.T + b_norms
                if mask is not None:
                    dist[:, ~mask[r0:r1]] = np.inf
                D[q], I[q] = _keep_nearest(D[q], I[q], dist, self._ids[r0:r1], kk)
        order = np.argsort(D, axis=1, kind="stable")
        return np.maximum(np.take_along_axis(D, order, 1), 0), np.take_along_axis(I, order, 1)


def _consecutive(rows: np.ndarray) -> bool:
    return len(rows) > 0 and bool((np.diff(rows) == 1).all())


def _keep_nearest(D: np.ndarray, I: np.ndarray, dist: np.ndarray, ids: np.ndarray, kk: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The kk nearest of (D, I) (nq, kk) and a block of distances (nq, b) to `ids` (b,), unordered."""
    D_all = np.hstack([D, dist])
    I_all = np.hstack([I, np.broadcast_to(ids, dist.shape)])
    top = np.argpartition(D_all, kk - 1, axis=1)[:, :kk] if D_all.shape[1] > kk else \
        np.broadcast_to(np.arange(D_all.shape[1]), D_all.shape)
    return np.take_along_axis(D_all, top, 1), np.take_along_axis(I_all, top, 1)
