"""The middleware: API key, body size limit, request metrics."""

from __future__ import annotations

import hmac
import time

from .deps import Service
from .errors import error

# Open without the key: health, and the API's shape (docs, their assets, the OpenAPI document).
# /metrics needs the key, as in Qdrant: see the README for Prometheus.
PUBLIC = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
PUBLIC_PREFIX = "/static-offline-docs/"


class Guard:
    """Pure ASGI middleware: API key, body size limit, request metrics.

    The body limit counts bytes as they arrive (chunked bodies too) and answers 413
    before the route sees the body; the body is then replayed to the app.
    """

    def __init__(self, app, svc: Service):
        self.app, self.svc, self.settings, self.metrics = app, svc, svc.settings, svc.metrics
        self.key = self.settings.api_key.encode() if self.settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.svc.in_flight += 1
        try:
            rejection = self._check_key(scope) or self._check_length(scope)
            if rejection is None and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                rejection, receive = await self._read_body(receive)
            if rejection is not None:
                await rejection(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.svc.in_flight -= 1
            route = scope.get("route")
            template = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(template, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(template, scope["method"]).observe(time.perf_counter() - started)

    def _check_key(self, scope):
        if self.key is None or scope["path"] in PUBLIC or scope["path"].startswith(PUBLIC_PREFIX):
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"api-key", b"")
        auth = headers.get(b"authorization", b"")
        if not given and auth.lower().startswith(b"bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given, self.key):
            return error(401, "missing or wrong API key (send the 'api-key' header or 'Authorization: Bearer')")
        return None

    def _too_large(self):
        return error(413, f"request body over the limit of {self.settings.max_body_bytes} bytes")

    def _check_length(self, scope):
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            return self._too_large()
        return None

    async def _read_body(self, receive):
        """Read the whole body, counting bytes; returns (a 413 response or None, a receive replaying it)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None, receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                return self._too_large(), receive
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay
