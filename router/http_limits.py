"""Limits on the HTTP request head (request line + headers) for uvicorn's httptools parser.

uvicorn 0.54 bounds neither the size of a request head with httptools (a 256 MB header
was buffered whole) nor the time a client may take to send it (half-sent headers held a
connection for minutes); its h11 parser has a size limit only, and costs ~0.3 ms more
per request on this machine. This protocol keeps httptools and adds both:

- a head larger than `max_head_bytes` is answered 400 and the connection closed;
- a head not complete `head_timeout_s` after the connection opened (or after the
  previous response ended) closes the connection.

It counts the bytes fed to the parser while a head is incomplete: one addition per read.

It also writes a response's head and the first part of its body together: uvicorn writes
them separately, and on loopback every write is a system call that also runs the
receiver's TCP work and wakes it (py-spy on the stub benchmark: `write(2)` 37 % of the
router's running samples, three writes per request before this).
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
        self.cycle.transport = _HeadWithBody(self.transport)  # type: ignore[assignment]

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # its head is parsed already: no head to wait for
        transport = self.cycle.transport if self.cycle is not None else None
        if isinstance(transport, _HeadWithBody):
            transport.flush()  # a response without body writes (HEAD)
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


class _HeadWithBody:
    """The transport as one response's cycle sees it: the response head (uvicorn's first
    write starting with a final status line) waits for the next write and goes out with
    it. A `100 Continue` is written at once (the client waits for it to send its body);
    `close` and the response's end write a head still held."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held = b""

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif data[:9] == b"HTTP/1.1 " and data[9:10] != b"1":
            self._held = data
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def bounded_httptools(max_head_bytes: int, head_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's `http=` protocol class with these limits on every request head."""
    return type(
        "BoundedHttpToolsProtocol",
        (_BoundedHead,),
        {"max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s},
    )
