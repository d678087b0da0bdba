"""Every error as Qdrant's error envelope, mapped to its status code once, here.

The service's own errors (service/errors.py) carry their status; a full disk (an OSError or
SQLite error that says so) is their 507; request validation is a 422 naming the first fields at fault; Starlette's HTTP errors (404 of an unknown route, 405) keep
their status.
"""

from __future__ import annotations

import logging
import sqlite3

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import QincoError, disk_full
from .responses import JSON

MAX_ERRORS_SHOWN = 5
log = logging.getLogger("qinco.http")


def error(status: int, message: str) -> JSON:
    return JSON({"status": {"error": message}, "time": 0.0}, status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    errors = exc.errors()
    for e in errors[:MAX_ERRORS_SHOWN]:
        # pydantic names union branches in the location (`list[...]`, tagged-union tags): keep the path
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body" and not str(p).startswith(("`", "function-")))
        parts.append(f"{where}: {e.get('msg')}" if where else e.get("msg", "invalid"))
    if len(errors) > MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more errors")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI):
    @app.exception_handler(QincoError)
    async def service_error(request, exc: QincoError):
        return error(exc.status_code, exc.message)

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def storage_error(request, exc: Exception):
        full = disk_full(exc)
        if full is None:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
            return error(500, f"internal error: {type(exc).__name__}")
        log.warning("%s %s: %s", request.method, request.url.path, exc)  # a quota, or a failing disk
        return error(full.status_code, full.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(422, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))
