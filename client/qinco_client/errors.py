"""Exceptions carrying the server's message."""

from __future__ import annotations


class QincoError(Exception):
    """Any error answered by the server (status >= 400) or reaching it."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message, self.status = message, status


class BadRequest(QincoError):  # 400, 422: the request was wrong; nothing changed
    pass


class Unauthorized(QincoError):  # 401
    pass


class NotFound(QincoError):  # 404
    pass


class Conflict(QincoError):  # 409
    pass


class TooLarge(QincoError):  # 413
    pass


class ServerError(QincoError):  # 5xx after the retries
    pass


class ConnectionFailed(QincoError):  # no answer after the retries
    pass


class TrainingFailed(QincoError):  # the training job ended with an error; the collection has no model
    pass


BY_STATUS = {400: BadRequest, 401: Unauthorized, 404: NotFound, 409: Conflict, 413: TooLarge, 422: BadRequest}


def from_response(status: int, body) -> QincoError:
    message = body.get("status", {}).get("error") if isinstance(body, dict) and isinstance(
        body.get("status"), dict) else None
    message = message or f"HTTP {status}"
    cls = BY_STATUS.get(status, ServerError if status >= 500 else QincoError)
    return cls(message, status)
