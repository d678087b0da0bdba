"""The registry: the collections of a data directory, which one process at a time may own.

<data_dir>/.lock is held (flock) while the registry is open; <data_dir>/collections/<name> is one
collection (engine/collection.py).  A collection is created in a hidden folder and renamed into
place, and deleted by a rename out of place, so a crash never leaves half of one.
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from model.index import QincoIndex
from model.io import atomic_write, load_model, save_model
from model.threads import use_threads

from ..errors import BadRequest, Conflict, NotFound, Unavailable
from ..memory import release_free_memory
from . import concurrency, record
from .collection import Collection
from .concurrency import REGISTRY, OrderedLock
from .config import CollectionConfig
from .ids import INT_ID_RANGE, is_int_id
from .space import MAX_SPACES

log = logging.getLogger("qinco.store")


def _free(name: str, threads: list[threading.Thread], wait: float | None = 2.0):
    """Give a deleted collection's memory back once its threads end.  Its parts refer to each other
    (snapshots, trainer, spaces): only the cycle collector frees them, whose full passes are rare,
    so its index (80 MiB at 16,384 lists) would stay until one came.  A refiner still encoding a
    batch after `wait` seconds (the `quality` encoder's take ~30 s) is waited for in a thread of its
    own, so that the DELETE answers."""
    deadline = None if wait is None else time.monotonic() + wait
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        concurrency.start("free", name, _free, name, threads, None)
        return
    gc.collect()
    release_free_memory()


class DataDirLocked(RuntimeError):
    pass


class Store:
    """The registry of a data directory's collections.  config: how they run; keyword overrides
    change its fields (Store(data_dir, fast_ingest=False))."""

    def __init__(self, data_dir: Path, config: CollectionConfig | None = None, **overrides):
        self.config = CollectionConfig(**{**(config.model_dump() if config else {}), **overrides})
        self.data_dir = Path(data_dir).resolve()
        self.root = self.data_dir / "collections"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._lock(self.data_dir)
        self.collections: dict[str, Collection] = {}
        self.failed: dict[str, str] = {}  # collections that could not be opened, and why
        self.lock = OrderedLock(REGISTRY, "registry lock")  # collections, failed, closed
        self.closed = False

    @staticmethod
    def _lock(data_dir: Path):
        """An exclusive lock on the data directory: two servers would overwrite each other's
        snapshots and sequence numbers.  The kernel drops it when the process dies."""
        f = open(data_dir / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise DataDirLocked(f"the data directory {data_dir} is in use by another QINCo Search process; "
                                f"give each server its own data directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f

    def open_all(self):
        """Open every collection; one that fails is listed in `failed` and the others serve."""
        for folder in sorted(self.root.iterdir()):
            with self.lock:
                if self.closed:
                    return
                if folder.name.startswith("."):
                    shutil.rmtree(folder, ignore_errors=True)  # an interrupted create or delete
                elif (folder / "collection.json").exists():
                    try:
                        self.collections[folder.name] = c = Collection(folder, self.config)
                        for space in c.spaces.values():
                            space.trainer.resume()
                    except Exception as e:
                        log.exception("collection %s could not be opened", folder.name)
                        self.failed[folder.name] = f"{type(e).__name__}: {e}"

    def get(self, name: str) -> Collection:
        try:
            return self.collections[name]
        except KeyError:
            if name in self.failed:
                raise Unavailable(f"collection {name!r} could not be opened: {self.failed[name]}") from None
            raise NotFound(f"collection {name!r} not found") from None

    def names(self) -> list[str]:
        return sorted(set(self.collections) | set(self.failed))

    def exists(self, name: str) -> bool:
        return name in self.collections or name in self.failed

    def resolve(self, path: str) -> Path:
        """A user-given path, inside the data directory only."""
        try:
            p = (self.data_dir / path).resolve()
            exists = p.exists()
        except (ValueError, OSError) as e:  # a NUL byte, a name too long, a loop of links
            raise BadRequest(f"path {path!r} cannot be used: {e}") from None
        if not p.is_relative_to(self.data_dir):
            raise BadRequest(f"path {path!r} is outside the data directory")
        if not exists:
            raise BadRequest(f"path {path!r} does not exist in the data directory")
        return p

    def create(self, name: str, metric: str, encoder: str, source: Path | None = None, from_index: bool = False,
               size: int | None = None, qinco: dict | None = None, named: dict[str, dict] | None = None,
               datatype: str = "float32") -> Collection:
        """A new collection from a model file or an index directory (a path already checked), or,
        with `size` and `qinco` settings (the config's defaults for those not given), one that
        trains its own model, keeping its originals as `datatype` (float32 or float16).  `named`:
        Qdrant's named vectors instead, {name: {"size", "metric", "datatype"}}, each a vector space
        that trains its own model with these settings (`size`, `metric`, `datatype` unused)."""
        use_threads(self.config.threads)
        trains = size is not None or named is not None
        qinco = self.config.self_training(qinco) if trains else None
        if named is not None and not 1 <= len(named) <= MAX_SPACES:
            raise BadRequest(f"a collection holds 1 to {MAX_SPACES} named vectors, not {len(named)}")
        with self.lock:
            if self.closed:
                raise Unavailable("the service is shutting down")
            if self.exists(name):
                raise Conflict(f"collection {name!r} already exists")
            tmp = self.root / f".new-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                if trains:
                    spaces = [{"name": n, **v} for n, v in named.items()] if named is not None \
                        else [{"name": "", "metric": metric, "size": size, "datatype": datatype}]
                    self._populate_trainable(tmp, name, [{**v, "encoder": encoder, "qinco": qinco} for v in spaces],
                                             named is not None)
                else:
                    self._populate(tmp, name, metric, encoder, source, from_index)
                os.replace(tmp, self.root / name)
            except BadRequest as e:  # name paths as the user gave them: inside the data directory
                shutil.rmtree(tmp, ignore_errors=True)
                raise BadRequest(str(e).replace(f"{self.data_dir}/", "")) from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            try:
                collection = Collection(self.root / name, self.config)
            except Exception as e:
                self._discard(self.root / name, name)
                raise BadRequest(f"the new collection cannot be opened: {e}") from None
            self.collections[name] = collection
            return collection

    @staticmethod
    def _populate(folder: Path, name: str, metric: str, encoder: str, source: Path, from_index: bool):
        try:
            if from_index:
                index = QincoIndex.load(source)
            else:
                index = QincoIndex(load_model(source))  # checks it can serve: IVF, fitted tables
        except Exception as e:  # a user's file, damaged in any way: never a 500
            raise BadRequest(f"cannot use {source.name}: {type(e).__name__}: {e}") from None
        save_model(index.model, folder / "model.safetensors")
        if index.tuning:
            atomic_write(folder / "tuning.json", lambda f: f.write(json.dumps(index.tuning).encode()))
        if index.ntotal:  # import the index's codes as the first write
            ids, codes = index.stored_codes()
            if len(ids) and not (is_int_id(ids.min()) and is_int_id(ids.max())):
                raise BadRequest(f"cannot use {source.name}: its point ids must be in {INT_ID_RANGE} (the ids "
                                 f"above are UUIDs'); rebuild it with --ids in that range")
            record.import_codes(folder / "points.sqlite", ids, codes)
        _write_meta(folder, name, [{"name": "", "metric": metric, "encoder": encoder}], named=False)

    @staticmethod
    def _populate_trainable(folder: Path, name: str, spaces: list[dict], named: bool):
        record.create(folder / "points.sqlite", len(spaces)).close()
        _write_meta(folder, name, spaces, named)

    def delete(self, name: str):
        with self.lock:
            threads = self._close(self.collections.pop(name)) if name in self.collections else None
            if threads is None and name not in self.failed:
                raise NotFound(f"collection {name!r} not found")
            self.failed.pop(name, None)
            self._discard(self.root / name, name)
        if threads is not None:  # outside the lock: a refiner may be in the middle of a batch
            _free(name, threads)

    @staticmethod
    def _close(collection: Collection) -> list[threading.Thread]:
        """Close a collection; the threads whose frames still hold it (its refiners, ending)."""
        collection.close()  # waits for a snapshot in progress
        return [space.refiner.thread for space in collection.spaces.values() if space.refiner.thread is not None]

    def _discard(self, folder: Path, name: str):
        if folder.exists():
            trash = self.root / f".deleted-{name}-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def close(self):
        """Close every collection (the loader stops at its next step), then free the directory."""
        with self.lock:
            self.closed = True
            for c in self.collections.values():
                c.close()
        self._lock_file.close()


def _write_meta(folder: Path, name: str, spaces: list[dict], named: bool):
    """collection.json: what the collection is (written once, atomically): its vector spaces
    (engine/space.py), and whether they were given as Qdrant's named vectors."""
    meta = {"name": name, "uuid": str(uuid.uuid4()), "created": time.time(), "named": named, "vectors": spaces}
    atomic_write(folder / "collection.json", lambda f: f.write(json.dumps(meta).encode()))
