"""Limits on the HTTP request head (request line + headers) for uvicorn's httptools parser.

uvicorn 0.54 bounds neither the size of a request head with httptools (a 256 MB header
was buffered whole) nor the time a client may take to send it (half-sent headers held a
connection for minutes); its h11 parser has a size limit only, and costs ~0.3 ms more
per request on this machine. This protocol keeps httptools and adds both:

- a head larger than `max_head_bytes` is answered 400 and the connection closed;
- a head not complete `head_timeout_s` after the connection opened (or after the
  previous response ended) closes the connection.

It counts the bytes fed to the parser while a head is incomplete: one addition per read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _BoundedHead(HttpToolsProtocol):
    max_head_bytes = 64 << 10
    head_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        was_in_head = self._in_head
        super().data_received(data)
        # A read that completed the head may carry body bytes too: only reads that leave
        # the head incomplete count (the overshoot is at most one read).
        if was_in_head and self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self.send_400_response("Request line and headers too large.")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # its head is parsed already: no head to wait for
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._await_head()

    def _await_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


def bounded_httptools(max_head_bytes: int, head_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's `http=` protocol class with these limits on every request head."""
    return type(
        "BoundedHttpToolsProtocol",
        (_BoundedHead,),
        {"max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s},
    )
