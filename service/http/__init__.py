"""The HTTP layer: Qdrant's REST API over the engine (FastAPI: app factory, middleware, metrics,
dependencies, error handlers, request/response schemas, one router per resource)."""
