"""The router's own HTTP/1.1 client to its engines (router/backend_client.py), against a
raw asyncio server on loopback that this module controls, so it can misbehave: answer in
pieces, close idle or mid-body, never answer, or accept no connection at all.

What the forwarder relies on: answers arrive whole or as they come, keep-alive
connections are reused but never a closed or expired one, every way of getting no
complete answer is a BackendFailure of the documented kind ("connect" and "reset" are
sent elsewhere, "timeout" never is), and a response closed early closes its connection
(vLLM aborts a request when its client's connection closes).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from loraplex.router import backend_client
from loraplex.router.backend_client import BackendClient, BackendFailure

LOOP_BOUND_S = 60.0
"""A whole test's event loop; a hang fails the test instead of stalling the run."""
SLACK_S = 5.0
"""Upper bound for things that should take milliseconds (the CI machine is loaded)."""


def run(main: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(main, LOOP_BOUND_S))


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request off the connection; None at EOF (the client closed it)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    start, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    method, target, _ = start.split(" ")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, target, headers, body)


def json_answer(payload: object, status: str = "200 OK", extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}"
    return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"

Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def answer_json(server: RawServer, reader: asyncio.StreamReader, writer) -> None:
    """Keep-alive: answers every request with what it received."""
    while (request := await read_request(reader)) is not None:
        server.requests.append(request)
        writer.write(json_answer({"path": request.target, "size": len(request.body)}))
        await writer.drain()


@dataclass
class RawServer:
    """An HTTP server on 127.0.0.1 written with asyncio streams: `handler` runs once per
    accepted connection; the connection is closed when it returns."""

    handler: Handler
    accepted: int = 0
    requests: list[Request] = field(default_factory=list)
    eofs: int = 0
    """Connections on which the client's EOF was read (the client closed them)."""
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    closed_by_server: asyncio.Event = field(default_factory=asyncio.Event)
    go_on: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by a test to let a handler that waits on it carry on."""
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader, writer) -> None:
        self.accepted += 1
        self._writers.append(writer)
        try:
            await self.handler(self, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.closed_by_server.set()

    async def wait_for_eof(self, reader: asyncio.StreamReader) -> None:
        """Read until the client closes the connection, then count it."""
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.eofs += 1
        self.eof.set()


async def within(awaitable: Awaitable[Any], bound_s: float = SLACK_S) -> Any:
    return await asyncio.wait_for(awaitable, bound_s)


# ---- answers -------------------------------------------------------------------------


def test_a_json_answer_its_status_headers_and_what_the_engine_received() -> None:
    async def handler(server: RawServer, reader, writer) -> None:
        request = await read_request(reader)
        assert request is not None
        server.requests.append(request)
        writer.write(json_answer({"ok": True}, "201 Created", "x-engine: vllm\r\n"))
        await server.wait_for_eof(reader)

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url + "/engine/", timeout_s=10, api_key="engine-key")
            try:
                response = await client.send("/v1/completions", b'{"model":"m"}', stream=False)
                assert response.status_code == 201
                assert (b"x-engine", b"vllm") in response.headers
                assert json.loads(await response.aread()) == {"ok": True}
            finally:
                await client.close()
            (request,) = server.requests
            assert (request.method, request.target) == ("POST", "/engine/v1/completions")
            assert request.headers["authorization"] == "Bearer engine-key"
            assert request.headers["content-type"] == "application/json"
            assert request.headers["host"] == server.url.removeprefix("http://")
            assert request.body == b'{"model":"m"}'

    run(main())


def test_no_engine_key_no_authorization_header() -> None:
    async def main() -> None:
        async with RawServer(answer_json) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                response = await client.send("/v1/completions", b"{}", stream=False)
                await response.aread()
            finally:
                await client.close()
            assert "authorization" not in server.requests[0].headers

    run(main())


def test_a_chunked_stream_is_read_as_it_comes_and_ends() -> None:
    async def handler(server: RawServer, reader, writer) -> None:
        while (request := await read_request(reader)) is not None:
            server.requests.append(request)
            writer.write(CHUNKED_HEAD + chunk(b"data: one\n\n"))
            await server.go_on.wait()  # the client must have "one" before "two" exists
            server.go_on.clear()
            writer.write(chunk(b"data: two\n\n") + chunk(b"data: [DONE]\n\n") + LAST_CHUNK)

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                response = await client.send("/v1/completions", b"{}", stream=True)
                assert response.status_code == 200
                chunks = response.aiter_raw()
                assert await within(anext(chunks)) == b"data: one\n\n"
                server.go_on.set()
                rest = [c async for c in chunks]
                assert b"".join(rest) == b"data: two\n\ndata: [DONE]\n\n"
                assert response.is_closed
                # The finished stream gave its connection back for the next request.
                response = await client.send("/v1/completions", b"{}", stream=True)
                server.go_on.set()
                assert b"[DONE]" in b"".join([c async for c in response.aiter_raw()])
            finally:
                await client.close()
            assert server.accepted == 1

    run(main())


def test_an_answer_without_length_ends_with_the_connection() -> None:
    async def handler(server: RawServer, reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                response = await client.send("/v1/completions", b"{}", stream=False)
                assert await response.aread() == b"all of it"
            finally:
                await client.close()

    run(main())


# ---- keep-alive ----------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection() -> None:
    async def main() -> None:
        async with RawServer(answer_json) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                for n in range(3):
                    response = await client.send(f"/v1/r{n}", b"x" * n, stream=False)
                    assert json.loads(await response.aread()) == {"path": f"/v1/r{n}", "size": n}
            finally:
                await client.close()
            assert server.accepted == 1
            assert len(server.requests) == 3

    run(main())


def test_a_connection_the_engine_closed_while_idle_is_not_reused() -> None:
    async def answer_once(server: RawServer, reader, writer) -> None:
        request = await read_request(reader)
        assert request is not None
        server.requests.append(request)
        writer.write(json_answer({"n": len(server.requests)}))
        await writer.drain()
        # and close at once, as uvicorn does when its keep-alive timeout expires

    async def main() -> None:
        async with RawServer(answer_once) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                response = await client.send("/v1/completions", b"{}", stream=False)
                assert json.loads(await response.aread()) == {"n": 1}
                await within(server.closed_by_server.wait())
                await asyncio.sleep(0.2)  # the client's loop reads the EOF
                response = await client.send("/v1/completions", b"{}", stream=False)
                assert response.status_code == 200
                assert json.loads(await response.aread()) == {"n": 2}
            finally:
                await client.close()
            assert server.accepted == 2

    run(main())


def test_an_idle_connection_past_its_expiry_is_closed_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine (uvicorn) would close it any moment: a request written into it is lost."""
    monkeypatch.setattr(backend_client, "KEEPALIVE_EXPIRY_S", 0.05)

    async def handler(server: RawServer, reader, writer) -> None:
        request = await read_request(reader)
        assert request is not None
        writer.write(json_answer({}))
        await server.wait_for_eof(reader)

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                await (await client.send("/v1/a", b"{}", stream=False)).aread()
                await asyncio.sleep(0.2)
                await (await client.send("/v1/b", b"{}", stream=False)).aread()
                assert server.accepted == 2
                await within(server.eof.wait())  # the expired one was closed by the client
            finally:
                await client.close()

    run(main())


def test_a_close_racing_a_reused_connections_request_sends_it_once_more() -> None:
    """The engine drops the request written into a reused connection without a byte of
    answer (a keep-alive close crossing our write): the client sends it again on a new
    connection, so even a lone replica answers it."""
    targets: list[str] = []

    async def handler(server: RawServer, reader, writer) -> None:
        request = await read_request(reader)
        assert request is not None
        targets.append(request.target)
        writer.write(json_answer({"answered": request.target}))
        await read_request(reader)  # the connection's next request: dropped

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                await (await client.send("/v1/a", b"{}", stream=False)).aread()
                response = await client.send("/v1/b", b"{}", stream=False)
                assert response.status_code == 200
                assert json.loads(await response.aread()) == {"answered": "/v1/b"}
            finally:
                await client.close()
            assert server.accepted == 2
            assert targets == ["/v1/a", "/v1/b"]

    run(main())


def test_a_request_is_sent_at_most_twice_and_a_fresh_connection_is_never_resent() -> None:
    """Dropped on the reused connection and again on the new one: "reset" (which the
    forwarder sends to another replica), after two sends, not more. A request dropped on
    a new connection may have reached a dying engine: never resent by the client."""

    async def handler(server: RawServer, reader, writer) -> None:
        if server.accepted == 1:
            await read_request(reader)
            writer.write(json_answer({}))
        await read_request(reader)  # dropped

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                await (await client.send("/v1/a", b"{}", stream=False)).aread()
                with pytest.raises(BackendFailure) as failure:
                    await client.send("/v1/b", b"{}", stream=False)
                assert failure.value.reason == "reset"
                assert failure.value.as_api_error().status == 503
                assert server.accepted == 2
                with pytest.raises(BackendFailure) as failure:  # nothing idle: a new one
                    await client.send("/v1/c", b"{}", stream=False)
                assert failure.value.reason == "reset"
                assert server.accepted == 3
            finally:
                await client.close()

    run(main())


# ---- no answer -----------------------------------------------------------------------


def test_connection_refused_is_a_connect_failure() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        client = BackendClient(f"http://127.0.0.1:{port}", timeout_s=10)
        try:
            started = time.monotonic()
            with pytest.raises(BackendFailure) as failure:
                await client.send("/v1/completions", b"{}", stream=False)
            assert failure.value.reason == "connect"
            assert time.monotonic() - started < SLACK_S
            assert failure.value.as_api_error().status == 503
        finally:
            await client.close()

    run(main())


def test_a_connect_that_never_completes_times_out_as_a_connect_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listener whose accept queue is full drops further SYNs: connect hangs."""
    monkeypatch.setattr(backend_client, "CONNECT_TIMEOUT_S", 0.3)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):  # fill the queue (backlog 0 admits one or two)
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.1)

    async def main() -> None:
        client = BackendClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=10)
        try:
            started = time.monotonic()
            with pytest.raises(BackendFailure) as failure:
                await client.send("/v1/completions", b"{}", stream=False)
            assert failure.value.reason == "connect"
            assert 0.25 < time.monotonic() - started < SLACK_S
        finally:
            await client.close()

    try:
        run(main())
    finally:
        for sock in (*fillers, listener):
            sock.close()


def test_an_engine_that_never_answers_times_out_and_the_request_is_aborted() -> None:
    async def handler(server: RawServer, reader, writer) -> None:
        await read_request(reader)
        await server.wait_for_eof(reader)  # no answer; the client must hang up

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=0.2)
            try:
                started = time.monotonic()
                with pytest.raises(BackendFailure) as failure:
                    await client.send("/v1/completions", b"{}", stream=False)
                elapsed = time.monotonic() - started
                assert failure.value.reason == "timeout"
                assert failure.value.as_api_error().status == 504
                assert 0.15 < elapsed < SLACK_S
                await within(server.eof.wait())  # vLLM aborts the request
            finally:
                await client.close()

    run(main())


def test_a_stream_that_stalls_times_out_per_read() -> None:
    async def handler(server: RawServer, reader, writer) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + chunk(b"data: one\n\n"))
        await server.wait_for_eof(reader)

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=0.2)
            try:
                response = await client.send("/v1/completions", b"{}", stream=True)
                chunks = response.aiter_raw()
                assert await anext(chunks) == b"data: one\n\n"
                started = time.monotonic()
                with pytest.raises(BackendFailure) as failure:
                    await anext(chunks)
                assert failure.value.reason == "timeout"
                assert time.monotonic() - started < SLACK_S
                await within(server.eof.wait())
            finally:
                await client.close()

    run(main())


# ---- broken answers ------------------------------------------------------------------

BROKEN_BODIES = [
    # (name, the answer before the engine closes, the body bytes it carried)
    ("chunked_without_last_chunk", CHUNKED_HEAD + chunk(b"data: one\n\n"), b"data: one\n\n"),
    (
        "shorter_than_its_length",
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b'{"partial": ',
        b'{"partial": ',
    ),
]


@pytest.mark.parametrize("name,answer,carried", BROKEN_BODIES, ids=[b[0] for b in BROKEN_BODIES])
def test_a_body_cut_by_the_engine_is_a_reset_not_a_short_body(
    name: str, answer: bytes, carried: bytes
) -> None:
    async def handler(server: RawServer, reader, writer) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.05)  # the head arrives before the cut

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                response = await client.send("/v1/completions", b"{}", stream=False)
                with pytest.raises(BackendFailure) as failure:
                    await response.aread()
                assert failure.value.reason == "reset"
                response = await client.send("/v1/completions", b"{}", stream=True)
                received = []
                with pytest.raises(BackendFailure) as failure:
                    async for piece in response.aiter_raw():
                        received.append(piece)
                assert failure.value.reason == "reset"
                assert b"".join(received) == carried  # what came, then the failure
            finally:
                await client.close()
            assert server.accepted == 2

    run(main())


def test_an_invalid_answer_is_a_reset() -> None:
    async def handler(server: RawServer, reader, writer) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await server.wait_for_eof(reader)

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                with pytest.raises(BackendFailure) as failure:
                    await client.send("/v1/completions", b"{}", stream=False)
                assert failure.value.reason == "reset"
            finally:
                await client.close()

    run(main())


def test_closing_a_stream_early_closes_its_connection() -> None:
    """The client left mid-stream: the engine sees EOF (vLLM aborts the request) and the
    connection is not reused."""

    async def handler(server: RawServer, reader, writer) -> None:
        if server.accepted > 1:
            await answer_json(server, reader, writer)
            return
        await read_request(reader)
        writer.write(CHUNKED_HEAD + chunk(b"data: one\n\n"))
        await server.wait_for_eof(reader)

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                response = await client.send("/v1/completions", b"{}", stream=True)
                assert await anext(response.aiter_raw()) == b"data: one\n\n"
                await response.aclose()
                assert response.is_closed
                await within(server.eof.wait())
                assert server.eofs == 1
                response = await client.send("/v1/completions", b"{}", stream=False)
                assert json.loads(await response.aread())["path"] == "/v1/completions"
            finally:
                await client.close()
            assert server.accepted == 2

    run(main())


# ---- big bodies ----------------------------------------------------------------------

BIG = bytes(range(256)) * (4 * 4096)  # 4 MiB, every byte value


async def echo(server: RawServer, reader, writer) -> None:
    """Answers each request with its body: whole (content-length), or chunked in 64 KiB
    pieces when the path ends in /stream."""
    while (request := await read_request(reader)) is not None:
        server.requests.append(request)
        if request.target.endswith("/stream"):
            writer.write(CHUNKED_HEAD)
            for start in range(0, len(request.body), 65536):
                writer.write(chunk(request.body[start : start + 65536]))
                await writer.drain()
            writer.write(LAST_CHUNK)
        else:
            head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(request.body)
            writer.write(head + request.body)
        await writer.drain()


def test_megabytes_both_ways_intact_whole_and_streamed() -> None:
    """Also past the client's read-ahead bound (256 KiB), where it stops reading from the
    engine until its reader catches up: a whole read must not wait on that forever, and a
    connection must not go back to the pool with its reading still stopped."""

    async def main() -> None:
        async with RawServer(echo) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                for _ in range(2):  # the second time on the reused connection
                    response = await client.send("/v1/echo", BIG, stream=False)
                    assert await response.aread() == BIG
                response = await client.send("/v1/stream", BIG, stream=True)
                received = bytearray()
                async for piece in response.aiter_raw():
                    received += piece
                    await asyncio.sleep(0)  # a reader slower than loopback
                assert received == BIG
                # A whole answer that crossed the bound in its last read (asyncio reads
                # 256 KiB at most), then left unread: its connection goes back to the pool.
                response = await client.send("/v1/echo", BIG[:400_000], stream=True)
                await asyncio.sleep(0.3)
                await response.aclose()
                response = await client.send("/v1/echo", b"small", stream=False)
                assert await response.aread() == b"small"
            finally:
                await client.close()
            assert [len(r.body) for r in server.requests] == [len(BIG)] * 3 + [400_000, 5]
            assert server.accepted == 1

    run(main())


def test_a_slow_reader_of_a_long_stream_gets_every_byte() -> None:
    async def main() -> None:
        async with RawServer(echo) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                response = await client.send("/v1/stream", BIG, stream=True)
                received = bytearray()
                async for piece in response.aiter_raw():
                    received += piece
                    if len(received) < 1 << 20:
                        await asyncio.sleep(0.005)
                assert received == BIG
                response = await client.send("/v1/echo", b"next", stream=False)
                assert await response.aread() == b"next"
            finally:
                await client.close()
            assert server.accepted == 1

    run(main())


# ---- no proxy ------------------------------------------------------------------------


def test_the_engine_is_reached_directly_whatever_the_proxy_variables_say(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forwarding, the health probe and /metrics reads all connect to the engine itself
    (on loopback or the pod network), never through HTTP_PROXY: one path, so a probe
    cannot eject a replica that forwarding would reach, or the reverse."""
    with socket.socket() as sock:  # a proxy that refuses every connection
        sock.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def handler(server: RawServer, reader, writer) -> None:
        while (request := await read_request(reader)) is not None:
            server.requests.append(request)
            writer.write(json_answer({"path": request.target}))
            await writer.drain()

    async def main() -> None:
        async with RawServer(handler) as server:
            client = BackendClient(server.url, timeout_s=10)
            try:
                response = await client.send("/v1/completions", b"{}", stream=False)
                assert json.loads(await response.aread()) == {"path": "/v1/completions"}
                assert await client.is_healthy(timeout_s=SLACK_S)
                metrics = await client.get("/metrics", timeout=httpx.Timeout(SLACK_S))
                assert metrics.status_code == 200
            finally:
                await client.close()
            assert [r.target for r in server.requests] == ["/v1/completions", "/health", "/metrics"]

    run(main())
