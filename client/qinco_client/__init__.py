"""Python client for QINCo Search: qdrant-client's `QdrantClient` / `AsyncQdrantClient` with the
QINCo calls added (`Client`, `AsyncClient`); Qdrant's models come from `qdrant_client.models`."""

from .client import AsyncClient, Client
from .errors import (BadRequest, Conflict, ConnectionFailed, NotFound, QincoError, ServerError, TooLarge,
                     TrainingFailed, Unauthorized)
from .models import BytesPerPoint, CollectionInfo, ModelStats, QincoStatus, TrainingJob

__all__ = ["Client", "AsyncClient", "QincoError", "BadRequest", "Unauthorized", "NotFound", "Conflict",
           "TooLarge", "ServerError", "ConnectionFailed", "TrainingFailed", "CollectionInfo", "QincoStatus",
           "TrainingJob", "ModelStats", "BytesPerPoint"]
