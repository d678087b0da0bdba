"""Snapshots and recovery of a collection's indexes, one per vector space.

A snapshot is the index of each space as of sequence number S, in <collection>/snapshot/:
index.faiss (the quantizer and tables) and lists.npz (codes and ids, flat arrays read in one
go) for space 0, index_K.faiss and lists_K.npz for space K, and snapshot.json (seq, the
collection's uuid, per space its ntotal and model generation, and the files of the declared
payload indexes, payload_J.npz: engine/field_index.py's arrays), replaced atomically.
Snapshots written before lists.npz hold the codes in index.faiss: they load too.  On open, a space's
snapshot is loaded if the manifest matches (same collection, same generation, not ahead of the
record), then every id whose vector changed after S is re-applied from SQLite; without one the
index is rebuilt from every row.  Codes are stored, so recovery never re-encodes.  A collecting
space's state is its originals in the record: no snapshot file.  A payload index in the snapshot
is loaded, then points deleted since are taken out and those whose payload was written after S
(points.seq) indexed again; a declared index the snapshot lacks is built from every payload.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import TYPE_CHECKING

import faiss
import numpy as np

from model.index import QincoIndex
from model.lists import ListStore
from model.io import atomic_write, fsync_folder
from model.threads import use_threads

from ..errors import NotFound
from . import concurrency
from .field_index import FieldIndex, canonical_key
from .index import ExactSpaceIndex, QincoSpaceIndex, Snapshot, SpaceIndex
from .space_record import scoped

if TYPE_CHECKING:  # annotations only: the collection imports this module
    from .collection import Collection
    from .filters import PayloadIndexes
    from .space import VectorSpace

log = logging.getLogger("qinco.store")
PAYLOAD_FILE = re.compile(r"payload_[0-9]+\.npz")  # a payload index's file in the snapshot
COMPACT_AFTER = 10_000  # dead rows before an originals file is compacted (and half its rows)


def index_file(k: int) -> str:
    """The snapshot's file of space k's quantizer and tables."""
    return scoped("index", k) + ".faiss"


def lists_file(k: int) -> str:
    """The snapshot's file of space k's lists."""
    return scoped("lists", k) + ".npz"


def unit_norm(space: VectorSpace) -> bool:
    """Whether the space's originals have norm 1: a cosine space's, stored as float32 (float16
    rounding moves a norm by up to ~1e-3, which a search should see)."""
    return space.metric == "cosine" and space.record.file is not None and space.record.file.datatype == "float32"


class Snapshots:
    """A collection's snapshot, its recovery, and the count of points changed since the last one."""

    def __init__(self, collection: Collection):
        self.c = collection
        self.changed = 0  # points changed since the last snapshot (write lock)

    # ---- recovery --------------------------------------------------------------------------------
    def recover(self, space: VectorSpace) -> tuple[SpaceIndex, dict]:
        """A space's index as of the last commit, and what was done: {"snapshot_seq", "replayed"
        (ids changed after it), "seconds"}."""
        t0 = time.time()
        record = space.record
        if space.collecting:
            index = ExactSpaceIndex(record.file, *record.original_rows(), unit_norm(space))
            log.info("%s: %s: %d original vectors ready in %.1fs (no model yet: exact search)",
                     self.c.name, space.label, index.ntotal, time.time() - t0)
            return index, {"snapshot_seq": 0, "replayed": index.ntotal, "seconds": round(time.time() - t0, 3)}
        index, seq = self._load(space)
        changed = record.changed_ids(seq)
        if changed and index.ntotal:
            index.remove(np.array(changed, dtype=np.int64))
        for ids, codes in record.codes_after(seq, 1 + space.model.cfg.M):
            index.add(codes, ids, np.zeros(len(ids), bool))  # none is stored: removed above
        log.info("%s: %s: %d points ready in %.1fs (snapshot seq %d, %d changed after it)",
                 self.c.name, space.label, index.ntotal, time.time() - t0, seq, len(changed))
        return index, {"snapshot_seq": seq, "replayed": len(changed), "seconds": round(time.time() - t0, 3)}

    def _load(self, space: VectorSpace) -> tuple[QincoSpaceIndex, int]:
        """The snapshot's index of a space and its seq if it is this collection's and usable; else
        an empty one, 0."""
        c = self.c
        snap = c.folder / "snapshot"
        if (snap / "snapshot.json").exists():
            try:
                info = self._manifest()
                # a snapshot written before named vectors holds space 0's figures at its top level
                spaces = info["spaces"] if "spaces" in info else [info]
                mine = spaces[space.k] if space.k < len(spaces) else None
                if mine is None:  # written while the space was collecting: nothing of it to load
                    return QincoSpaceIndex(QincoIndex(space.model, tuning=space.tuning)), 0
                if mine.get("generation", 0) != space.generation:
                    raise ValueError(f"it holds the codes of model generation {mine.get('generation', 0)}")
                faiss_index = faiss.read_index(str(snap / index_file(space.k)))
                lists = None
                if (snap / lists_file(space.k)).exists():
                    lists = ListStore.load(snap / lists_file(space.k), space.model.cfg.nlist, faiss_index.code_size)
                n = faiss_index.ntotal if lists is None else lists.ntotal
                if n != mine["ntotal"] or faiss_index.d != space.model.cfg.d:
                    raise ValueError("snapshot does not match its manifest")
                index = QincoIndex(space.model, faiss_index, space.tuning, lists=lists)
                return QincoSpaceIndex(index), int(info["seq"])
            except (ValueError, RuntimeError, KeyError, TypeError, OSError, json.JSONDecodeError) as e:
                log.warning("%s: ignoring unusable snapshot of %s (%s); rebuilding from the database",
                            c.folder, space.label, e)
        return QincoSpaceIndex(QincoIndex(space.model, tuning=space.tuning)), 0

    def _manifest(self) -> dict:
        """snapshot.json, if it is this collection's and not ahead of the record (else ValueError)."""
        info = json.loads((self.c.folder / "snapshot" / "snapshot.json").read_text())
        if info.get("collection_uuid") != self.c.uuid:
            raise ValueError(f"it belongs to another collection (uuid {info.get('collection_uuid')})")
        if int(info["seq"]) > self.c.record.last_seq():
            raise ValueError(f"snapshot seq {info['seq']} is ahead of the database")
        return info

    def recover_payload_indexes(self, indexes: PayloadIndexes) -> int:
        """The declared payload indexes that the snapshot holds, loaded into `indexes` and brought up
        to date with the record (after `recover`: the point set is needed); returns how many."""
        c, snap = self.c, self.c.folder / "snapshot"
        try:
            info = self._manifest() if (snap / "snapshot.json").exists() else {}
            entries, seq = list(info.get("payload_indexes") or []), int(info.get("seq", 0))
            untracked = (c.record.last_seq() - seq) - (c.record.tracked_writes() - int(info["tracked_writes"]))
        except Exception:  # `_load` says why the snapshot is unusable (or it predates tracked_writes)
            return 0
        if entries and untracked:  # a build that did not set points.seq wrote since (a downgrade)
            log.warning("%s: %d writes since the snapshot came from an older build; rebuilding the payload indexes",
                        c.folder, untracked)
            return 0
        loaded: dict[str, FieldIndex] = {}
        for entry in entries:
            try:
                key, name = entry
                if not isinstance(key, str) or not isinstance(name, str) or not PAYLOAD_FILE.fullmatch(name):
                    raise ValueError(f"not a payload index entry: {entry!r}")
                if key not in indexes.declared or canonical_key(key) in loaded:
                    continue
                with np.load(snap / name, allow_pickle=False) as arrays:
                    index = FieldIndex.from_arrays(arrays)
                if index.key != canonical_key(key):
                    raise ValueError(f"it holds the index of {index.key!r}")
            except Exception as e:  # a cache of the payloads: whatever is wrong, it is rebuilt from them
                log.warning("%s: ignoring the snapshot's payload index %r (%s); rebuilding it", c.folder, entry, e)
                continue
            held = index.ids()
            index.remove_many(held[~c.points.contains(held)].tolist())  # deleted since
            loaded[index.key] = index
        if loaded:  # the points written, or whose payload changed, since: indexed again
            changed = c.record.point_ids_after(seq).tolist()
            for index in loaded.values():
                index.remove_many(changed)
            for chunk in c.record.payloads_after(seq):  # none of them is held now: old={} skips a pass
                for index in loaded.values():
                    index.add_many([i for i, _ in chunk], [p for _, p in chunk], {})
        indexes.fields.update(loaded)
        return len(loaded)

    # ---- snapshots -------------------------------------------------------------------------------
    def write(self) -> int:
        """Write the index as of the current sequence number; returns it.

        `close` waits for a snapshot in progress, so none can land in the folder of a
        collection deleted (and perhaps created again) meanwhile.
        """
        c = self.c
        with c.locks.snapshot:
            with c.locks.write:  # no write between reading seq and copying the index
                c.check_writable()  # a broken index must not become the record
                seq = c.record.last_seq()
                blobs = [space.index.serialize() for space in c.spaces.values()]
                fields = c.payload_indexes.arrays()
                if all(blob is None for blob in blobs) and not fields:  # the record holds it all
                    c.record.forget_deletes(seq)
                    self.compact_originals()
                    return seq
                spaces = [None if blob is None else {"ntotal": space.index.ntotal, "generation": space.generation}
                          for space, blob in zip(c.spaces.values(), blobs)]
                manifest = {"seq": seq, "tracked_writes": c.record.tracked_writes(), "collection_uuid": c.uuid,
                            "spaces": spaces,
                            "payload_indexes": [[key, f"payload_{j}.npz"] for j, key in enumerate(fields)]}
            self._replace(blobs, manifest, list(fields.values()))
            with c.locks.write:
                c.record.forget_deletes(seq)
                self.compact_originals()
            return seq

    def compact_originals(self):
        """Compact each space's originals file once most of its rows are replaced or deleted
        vectors' (write lock held; not while a job's worker reads the file)."""
        for space in self.c.spaces.values():
            f = space.record.file
            if f is None or space.job is not None or f.rows < 2 * COMPACT_AFTER:
                continue
            dead = space.record.dead_originals()
            if dead < max(COMPACT_AFTER, f.rows // 2):
                continue
            free = shutil.disk_usage(f.path.parent).free
            if free < 2 * (f.rows - dead) * f.row_bytes:  # the copy, with room to spare
                log.warning("%s: %s: originals not compacted (%d dead rows): too little free disk",
                            self.c.name, space.label, dead)
                continue
            t0 = time.time()
            try:
                with self.c.record.transaction():
                    new = space.record.compact_originals()
                    # an exact index searches the file: the new one, at the new rows (made before the
                    # commit, so that a failure leaves the old file and index serving)
                    index = ExactSpaceIndex(new, *space.record.original_rows(), unit_norm(space)) \
                        if space.index.exact else None
            except Exception:  # the old file still serves: the next snapshot tries again
                log.exception("%s: %s: compacting the originals failed", self.c.name, space.label)
                continue
            if index is not None:
                with self.c.locks.index.write():
                    space.index = index
            log.info("%s: %s: originals compacted, %d dead rows dropped in %.1fs",
                     self.c.name, space.label, dead, time.time() - t0)

    def _replace(self, blobs: list[Snapshot | None], manifest: dict, fields: list[dict]):
        folder = self.c.folder
        tmp = folder / ".snapshot.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for k, blob in enumerate(blobs):
            if blob is not None:
                atomic_write(tmp / index_file(k), lambda f: f.write(memoryview(blob.faiss)))
                atomic_write(tmp / lists_file(k), blob.lists.save)
        for (_, name), arrays in zip(manifest["payload_indexes"], fields):
            atomic_write(tmp / name, lambda f: np.savez(f, **arrays))
        atomic_write(tmp / "snapshot.json", lambda f: f.write(json.dumps(manifest).encode()))
        old, snap = folder / ".snapshot.old", folder / "snapshot"
        shutil.rmtree(old, ignore_errors=True)
        if snap.exists():
            os.replace(snap, old)
        os.replace(tmp, snap)
        shutil.rmtree(old, ignore_errors=True)
        fsync_folder(folder)

    def count(self, changed: int):
        """Count points changed by a write (write lock held: a counter read and written by two
        writers at once would lose one's count); past snapshot_every, snapshot in the background."""
        self.changed += changed
        if self.changed >= self.c.config.snapshot_every and not self.c.locks.snapshot.locked():
            self.changed = 0
            self.start()

    def start(self):
        concurrency.start("snapshot", self.c.name, self._write_quietly)

    def _write_quietly(self):
        use_threads(self.c.config.threads)
        try:
            if not self.c.closed:
                self.write()
        except NotFound:  # deleted meanwhile
            pass
        except Exception:  # a failed snapshot loses nothing: SQLite still has every row
            log.exception("%s: snapshot failed", self.c.name)
