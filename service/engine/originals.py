"""A vector space's original vectors on disk: an append-only file of rows, float32 or float16
(Qdrant's `datatype`); the record maps ids to rows (space_record.py).  The server reads rows (a
rescore, a retrieve, a swap's catch-up) with pread, copies out of the page cache: a map's pages
would count in its resident memory, and months of rescores would map the whole file there.  Only
the exact index of a space without a model scans it through a map (`MappedOriginals`, 4x faster
than pread's copies at 384-d), which goes with that index when the first model arrives.  (The
training worker, a process of its own, maps the file to sample it: `read_rows`.)

Durability: a write appends its rows and makes them durable (`sync`, fdatasync) before the
record's transaction that maps ids to them commits, so an acknowledged original is on disk.  The
record also holds the count of committed rows: rows past it (a write that did not commit) are
overwritten by the next append and cut off when the file is opened.

Readers never take a lock: within one generation the file only grows, so a row that a reader
found in the record is inside the file.  Dropping the originals, or compacting them (once most
rows are those of replaced or deleted vectors), writes a new generation's file, named for it,
which the record names in the same transaction that maps ids to its rows; a reader that read the
old generation's rows reads the record again (`SpaceRecord.originals`).  Files of other
generations are removed once the record names another, and at open.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from model.io import fsync_folder

DATATYPES = {"float32": np.float32, "float16": np.float16}
SUFFIXES = {"float32": "f32", "float16": "f16"}
ANNOUNCE_RUNS, ANNOUNCE_BYTES = 1024, 64 << 20  # runs of rows announced to the kernel ahead of their reads


def file_path(folder: Path, scope: str, generation: int, datatype: str) -> Path:
    """`scope`: the space's table name ('originals', 'originals_1', ...)."""
    return folder / f"{scope}-{generation}.{SUFFIXES[datatype]}"


def windows(spans: list[tuple[int, int]], row_bytes: int) -> list[list[tuple[int, int]]]:
    """(start, stop) runs in groups of at most ANNOUNCE_RUNS runs and ANNOUNCE_BYTES (one run may
    pass it alone): what one read announces ahead, so early pages are not evicted before use."""
    groups, size = [[]], 0
    for a, b in spans:
        if groups[-1] and (len(groups[-1]) == ANNOUNCE_RUNS or size + (b - a) * row_bytes > ANNOUNCE_BYTES):
            groups.append([])
            size = 0
        groups[-1].append((a, b))
        size += (b - a) * row_bytes
    return groups


def read_rows(path: Path, d: int, datatype: str, rows: np.ndarray) -> np.ndarray:
    """Rows of an originals file as float32 (n, d), read without the server (the training worker)."""
    if not len(rows):
        return np.zeros((0, d), dtype=np.float32)
    view = np.memmap(path, dtype=DATATYPES[datatype], mode="r").reshape(-1, d)
    return np.asarray(view[np.asarray(rows, dtype=np.int64)], dtype=np.float32)


class OriginalsFile:
    """One generation's file of one space.  `rows` committed rows; `end` rows written (write lock)."""

    def __init__(self, folder: Path, scope: str, d: int, datatype: str, generation: int, rows: int):
        self.path = file_path(folder, scope, generation, datatype)
        self.d, self.datatype, self.generation = d, datatype, generation
        self.dtype = np.dtype(DATATYPES[datatype])
        self.row_bytes = d * self.dtype.itemsize
        self.rows = self.end = rows
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        # Closed when the last holder lets go, never before: a reader that took this file before a
        # switch or a collection's delete must not read through a closed (or reused) descriptor.
        weakref.finalize(self, os.close, self._fd)
        if created:  # the file outlives a power loss: its first rows' commit needs it
            fsync_folder(folder)
        size = os.fstat(self._fd).st_size
        if size < rows * self.row_bytes:
            raise ValueError(f"{self.path.name} holds {size // self.row_bytes} rows, the record {rows}: the file "
                             f"was cut short outside the service")
        if size > rows * self.row_bytes:  # rows of a write that did not commit
            os.ftruncate(self._fd, rows * self.row_bytes)

    # ---- writes (write lock held, inside the record's transaction) --------------------------------
    def append(self, x: np.ndarray) -> np.ndarray:
        """Write (n, d) vectors after the rows written so far; returns their rows."""
        data = memoryview(np.ascontiguousarray(x, dtype=self.dtype)).cast("B")
        offset, done = self.end * self.row_bytes, 0
        while done < len(data):  # pwrite may write less than asked
            done += os.pwrite(self._fd, data[done:], offset + done)
        rows = np.arange(self.end, self.end + len(x), dtype=np.int64)
        self.end += len(x)
        return rows

    def sync(self):
        """Before the commit: the rows written are durable."""
        if self.end != self.rows:
            os.fdatasync(self._fd)

    def committed(self):
        self.rows = self.end

    def rolled_back(self):
        self.end = self.rows

    # ---- reads (any thread) ------------------------------------------------------------------------
    def read(self, rows: np.ndarray) -> np.ndarray:
        """Committed rows as float32 (n, d): one pread for each run of consecutive rows, the runs
        announced first, a window at a time (POSIX_FADV_WILLNEED: a cold page cache reads them in
        parallel, 4.5x faster for 100 scattered rows here)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        found = np.empty((len(rows), self.d), dtype=self.dtype)  # in the order of `ordered`
        runs = np.flatnonzero(np.diff(ordered) != 1) + 1
        spans = [(a, b) for a, b in zip([0, *runs.tolist()], [*runs.tolist(), len(rows)]) if a < b]
        for window in windows(spans, self.row_bytes):
            if len(window) > 1:
                self._announce([(int(ordered[a]), b - a) for a, b in window])
            for a, b in window:
                self._read_into(found[a:b], int(ordered[a]))
        out = np.empty((len(rows), self.d), dtype=np.float32)
        out[order] = found
        return out

    def _announce(self, runs: list[tuple[int, int]]):
        """Tell the kernel these (first row, rows) runs are read next: a hint, never an error."""
        if hasattr(os, "posix_fadvise"):  # Linux; not macOS
            try:
                for first, n in runs:
                    os.posix_fadvise(self._fd, first * self.row_bytes, n * self.row_bytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def _read_into(self, out: np.ndarray, first: int):
        """Rows first:first + len(out) into `out` (C-contiguous, this file's dtype)."""
        if first < 0:
            raise ValueError(f"row {first} is not a row of {self.path.name}")
        buffer = memoryview(out).cast("B")
        offset, done = first * self.row_bytes, 0
        while done < len(buffer):  # pread may read less than asked
            got = os.preadv(self._fd, [buffer[done:]], offset + done)
            if got == 0:
                raise ValueError(f"row {first + done // self.row_bytes} is past the end of {self.path.name}")
            done += got

    def fileno(self) -> int:
        return self._fd

    def size_on_disk(self) -> int:
        return self.rows * self.row_bytes

    def remove_others(self):
        """The files of the space's other generations (dropped or compacted, or a new one that
        did not commit): once the record names this one."""
        scope = self.path.name.rsplit("-", 1)[0]
        for other in self.path.parent.glob(f"{scope}-*.f*"):
            if other != self.path:
                other.unlink(missing_ok=True)

    def check_storable(self, x: np.ndarray):
        """ValueError for vectors that this file's datatype cannot hold (float16: |v| <= 65504)."""
        if self.dtype == np.float16 and len(x) and float(np.abs(x).max()) > float(np.finfo(np.float16).max):
            raise ValueError("a vector has a value beyond float16's range (|v| <= 65504), the datatype of "
                             "this collection's originals")


class MappedOriginals:
    """An originals file read through a memory map, for scans of consecutive blocks (an exact
    search: `read_range` gives views of the map).  The map's pages count in the process's resident
    memory until this object goes (with its exact index)."""

    def __init__(self, file: OriginalsFile):
        self.file, self.d = file, file.d
        self._view: np.ndarray | None = None
        self._lock = threading.Lock()  # remapping

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Committed rows as float32 (n, d), gathered from the map (a block of scattered rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.zeros((0, self.d), dtype=np.float32)
        if rows.min() < 0:
            raise ValueError(f"row {rows.min()} is not a row of {self.file.path.name}")
        return np.asarray(self._mapped(int(rows.max()) + 1)[rows], dtype=np.float32)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Committed rows start:stop as float32: a view of the map for a float32 file (no copy)."""
        return np.asarray(self._mapped(stop)[start:stop], dtype=np.float32)

    def _mapped(self, top: int) -> np.ndarray:
        """The map, covering at least `top` rows."""
        view = self._view
        if view is None or len(view) < top:
            with self._lock:
                view = self._view
                if view is None or len(view) < top:
                    view = self._view = self._map(top)
        return view

    def _map(self, top: int) -> np.ndarray:
        f = self.file
        n = os.fstat(f.fileno()).st_size // f.row_bytes
        if n < top:  # never touch a page past the end of the file (SIGBUS)
            raise ValueError(f"row {top - 1} is past the end of {f.path.name} ({n} rows)")
        m = mmap.mmap(f.fileno(), n * f.row_bytes, access=mmap.ACCESS_READ)
        return np.frombuffer(m, dtype=f.dtype).reshape(n, self.d)
