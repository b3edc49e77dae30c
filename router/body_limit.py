"""ASGI middleware: a request body larger than the limit is a 413, never buffered whole.

A declared `Content-Length` over the limit is refused before any byte is read; a chunked
(or lying) body is counted while it is read and refused the moment it passes the limit.
Pure ASGI, so bodies and streamed responses pass through untouched.
"""

from __future__ import annotations

from typing import Any

from loraplex.router.errors import APIError, error_response


def body_too_large(limit_bytes: int) -> APIError:
    return APIError(
        413,
        f"Request body is larger than {limit_bytes} bytes.",
        code="request_too_large",
    )


class BodyLimitMiddleware:
    def __init__(self, app: Any, *, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit_bytes:
            await error_response(body_too_large(self.limit_bytes))(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit_bytes:
                    raise body_too_large(self.limit_bytes)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except APIError as exc:
            # Raised by counted_receive in a middleware (a route's own handler answers it
            # there); anything else re-raises.
            if started or exc.status != 413:
                raise
            await error_response(exc)(scope, receive, send)


def _content_length(scope: dict) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
