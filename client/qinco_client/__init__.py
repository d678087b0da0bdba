"""Python client for QINCo Search: `Client` (sync) and `AsyncClient` (async), typed results."""

from .client import AsyncClient, Client
from .errors import (BadRequest, Conflict, ConnectionFailed, NotFound, QincoError, ServerError, TooLarge,
                     TrainingFailed, Unauthorized)
from .models import (BytesPerPoint, CollectionInfo, ModelStats, QincoStatus, Record, ScoredPoint, TrainingJob,
                     UpdateResult)

__all__ = ["Client", "AsyncClient", "QincoError", "BadRequest", "Unauthorized", "NotFound", "Conflict",
           "TooLarge", "ServerError", "ConnectionFailed", "TrainingFailed", "CollectionInfo", "QincoStatus",
           "TrainingJob", "ModelStats", "BytesPerPoint", "ScoredPoint", "Record", "UpdateResult"]
