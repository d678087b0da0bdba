"""Python client for QINCo Search: `Client` (sync) and `AsyncClient` (async), typed results."""

from .client import AsyncClient, Client
from .errors import (BadRequest, Conflict, ConnectionFailed, NotFound, QincoError, ServerError, TooLarge,
                     Unauthorized)
from .models import CollectionInfo, Record, ScoredPoint, UpdateResult

__all__ = ["Client", "AsyncClient", "QincoError", "BadRequest", "Unauthorized", "NotFound", "Conflict",
           "TooLarge", "ServerError", "ConnectionFailed", "CollectionInfo", "ScoredPoint", "Record",
           "UpdateResult"]
