"""ASGI middleware: a request id on every response and one structured log line per request.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

log = logging.getLogger("loraplex.router.access")

REQUEST_ID_HEADER = b"x-request-id"
MAX_LOGGED_MODEL_CHARS = 256


class RequestLogMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            state = scope.get("state", {})
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "model": _cut(state.get("model")),
                    # Set by the API guard; the key's public prefix, never the key itself.
                    "tenant": state.get("tenant"),
                    "key_prefix": state.get("key_prefix"),
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )


def _cut(model: str | None) -> str | None:
    """A client's `model` string as logged: at most MAX_LOGGED_MODEL_CHARS (a 5 MB name
    must not become a 5 MB log line)."""
    if model is None or len(model) <= MAX_LOGGED_MODEL_CHARS:
        return model
    return model[:MAX_LOGGED_MODEL_CHARS] + "…"


def _incoming_request_id(scope: dict) -> str | None:
    for key, value in scope.get("headers", []):
        if key == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            # Echo only sane ids: they end up in logs and headers.
            if 0 < len(text) <= 128 and text.isprintable():
                return text
    return None
