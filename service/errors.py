"""The service's errors, each with the HTTP status it answers (in the style of Chroma's errors.py).

The engine raises them without knowing HTTP; service/http/errors.py turns every one into Qdrant's
error envelope with its status, in one exception handler.
"""

from __future__ import annotations

import errno
import sqlite3


class QincoError(Exception):
    """An error the client caused or can wait out; its message is meant for the client."""

    status_code = 500

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class BadRequest(QincoError):
    status_code = 400


class NotFound(QincoError):
    status_code = 404


class Conflict(QincoError):
    status_code = 409


class PayloadTooLarge(QincoError):
    """More points, ids or queries in one request than QINCO_MAX_BATCH."""

    status_code = 413


class InvalidInput(QincoError):
    """Input that the request schemas could not check, found invalid (a point id in a URL)."""

    status_code = 422


class Unavailable(QincoError):
    """A collection or service that cannot serve right now (loading, failed to open, broken)."""

    status_code = 503


class InsufficientStorage(QincoError):
    """The data directory's disk is full (or its quota spent).  WebDAV's 507: the server cannot
    store what the request needs.  Nothing of the request was stored; reads go on, and writes work
    again once space is freed."""

    status_code = 507


# SQLite reports a full disk (ENOSPC) as SQLITE_FULL, but a spent quota (EDQUOT) only as a failed write.
# Not a failed fsync: the commit's frames may already be in the WAL, so nothing can be promised.
UNWRITABLE = {sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_TRUNCATE, sqlite3.SQLITE_IOERR_SHMSIZE}


def disk_full(exc: BaseException) -> InsufficientStorage | None:
    """The 507 that an OSError or SQLite error means, if it says the disk is full (or a write failed)."""
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or code == sqlite3.SQLITE_FULL:
        return InsufficientStorage("the data directory's disk is full: nothing of this request was stored; "
                                   "reads still work, and writes will once space is freed")
    if code in UNWRITABLE:
        return InsufficientStorage("the data directory could not be written (a disk quota spent, or an I/O "
                                   "error: see the server log): nothing of this request was stored; reads still "
                                   "work, and writes will once the quota or the disk allows")
    return None
