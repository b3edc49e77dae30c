"""Request heads (line + headers) are bounded in size and in the time to send them
(issue 12, item 9): a real uvicorn server with the protocol `loraplex serve` uses."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
import uvicorn

from loraplex.router.http_limits import bounded_httptools
from tests.unit.registry_helpers import uvicorn_in_thread


async def _app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def port() -> Iterator[int]:
    protocol = bounded_httptools(max_head_bytes=64 << 10, head_timeout_s=1.0)
    config = uvicorn.Config(_app, host="127.0.0.1", port=0, http=protocol, log_level="error")
    with uvicorn_in_thread(config) as server:
        assert server.started
        yield server.servers[0].sockets[0].getsockname()[1]


def _exchange(port: int, request: bytes) -> tuple[bytes, float]:
    """(what the server answered before closing, seconds until then)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The server may answer and close while we are still sending.
        with contextlib.suppress(ConnectionResetError):
            sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\r\n0\r\n\r\n"):
                    break  # served (a kept-alive connection stays open)
        except ConnectionResetError:
            pass
    return answer, time.monotonic() - started


def test_a_normal_request_and_a_large_body_are_served(port: int) -> None:
    answer, _ = _exchange(
        port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 1000 + b"\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200")
    body = b"x" * 3_000_000  # bodies are limited by the app, not here
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    answer, _ = _exchange(port, head + body)
    assert answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("size", [200_000, 5_000_000])
def test_an_oversized_head_is_400_and_closed(port: int, size: int) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    answer, seconds = _exchange(port, request)
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(b"Request line and headers too large.")
    assert seconds < 5


@pytest.mark.parametrize(
    "request_bytes", [b"GET /health HTTP/1.1\r\nHost: x\r\n", b""], ids=["half-sent", "silent"]
)
def test_a_head_not_sent_in_time_closes_the_connection(port: int, request_bytes: bytes) -> None:
    answer, seconds = _exchange(port, request_bytes)
    assert answer == b""
    assert 0.9 <= seconds < 5
