"""The router's connections to one vLLM OpenAI server, and the calls it makes.

The router only forwards requests and probes `/health`: adapters are loaded by the
replica's own LoRA resolvers (serving/plugin.py) on first request, so nothing here
registers or unregisters them (docs/scaleout.md says why).

Forwarding is every request's hot path, so it has its own lean HTTP/1.1 client: an
asyncio protocol that writes the request head and body in one `write` and parses the
answer with httptools (uvicorn's C parser), over keep-alive connections reused last in,
first out. httpx over anyio cost about 1 ms of router CPU per request on this 2-core
machine (57 % of the router's running samples under py-spy on the stub benchmark: two
writes per request, cancel scopes and async-library lookups on every read;
bench/RESULTS.md). The health probe and `/metrics` reads keep httpx.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal
from urllib.parse import urlsplit

import httptools
import httpx

from loraplex.router.errors import APIError

FailureReason = Literal["connect", "reset", "timeout", "engine_dead"]

CONNECT_TIMEOUT_S = 5.0
KEEPALIVE_EXPIRY_S = 4.0
"""An idle connection older than this is not reused: uvicorn (vLLM's server) closes idle
keep-alive connections after 5 s, and a request written into one it is closing is lost."""
_PAUSE_READING_BYTES = 256 << 10
"""Unread answer bytes above this pause reading from the engine (a slow client)."""


class BackendFailure(Exception):
    """A request to a backend got no HTTP answer (or its answer broke off)."""

    def __init__(self, reason: FailureReason, detail: str, retry_after_s: int = 2) -> None:
        super().__init__(detail)
        self.reason = reason
        """connect: the request never reached the server (safe to send elsewhere);
        reset: the connection broke before a complete answer; timeout: no answer in time
        (the request may have run, so it is never sent again); engine_dead: the server
        answered that its engine died before producing anything."""
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.unanswered = False
        """The connection broke before any byte of an answer arrived."""

    def as_api_error(self) -> APIError:
        if self.reason == "timeout":
            return APIError(504, f"Backend timed out: {self.detail}", code="backend_timeout")
        return APIError(
            503,
            f"Backend unavailable: {self.detail}",
            code="backend_unavailable",
            headers={"Retry-After": str(self.retry_after_s)},
        )


class BackendClient:
    """Talks to one vLLM server: forwarding over its own connection pool, health and
    metrics reads over httpx."""

    def __init__(
        self, base_url: str, timeout_s: float, max_connections: int = 512, api_key: str = ""
    ) -> None:
        """`api_key`: the engine key (the backend_api_key setting), sent as a bearer token
        on every request when set."""
        self.base_url = base_url.rstrip("/")
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._connections = EngineConnections(self.base_url, timeout_s, max_connections, auth)
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=auth or None,
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=2),
            # Direct, as forwarding is (it never reads proxy variables): a probe sent
            # through HTTP_PROXY could eject a replica that forwarding reaches. Without
            # the environment httpx would also skip SSL_CERT_FILE: forwarding's TLS
            # trust instead (OpenSSL's defaults, which read it).
            trust_env=False,
            verify=ssl.create_default_context() if self.base_url.startswith("https") else True,
        )

    async def close(self) -> None:
        await self._connections.close()
        await self._client.aclose()

    async def is_healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            return (await self._client.get("/health", timeout=timeout_s)).status_code == 200
        except httpx.HTTPError:
            return False

    async def get(self, path: str, timeout: httpx.Timeout) -> httpx.Response:
        """A plain GET (the backend's /metrics); httpx errors propagate."""
        return await self._client.get(path, timeout=timeout)

    async def send(self, path: str, body: bytes, stream: bool) -> EngineResponse:
        """Forward a JSON request body as is. Returns once the answer's status and headers
        arrived (its body with `aread`, or as it comes with `aiter_raw`); the caller closes
        an answer it does not read to the end. Raises BackendFailure when no HTTP answer
        came back, also from the body's reads."""
        return await self._connections.post(path, body)


def error_detail(content: bytes) -> tuple[str, str | None]:
    """(message, param) of a backend error body, OpenAI-shaped or not."""
    try:
        error = json.loads(content)["error"]
        return str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        return content[:500].decode("utf-8", errors="replace"), None


class EngineResponse:
    """One answer: status and headers when `post` returns, then the body as it arrives."""

    def __init__(self, connection: _Connection, timeout_s: float, on_done: Callable[[], None]):
        self._connection = connection
        self._timeout_s = timeout_s
        self._on_done: Callable[[], None] | None = on_done
        self.status_code = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._headers_done = False
        self._complete = False
        self._error: BackendFailure | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._read_whole = False
        self.is_closed = False

    async def aread(self) -> bytes:
        """The whole body; raises BackendFailure if it breaks off or times out."""
        # All of it is kept anyway: reading paused past the read-ahead bound would only
        # wait for a reader that never comes (a body over 256 KiB timed out).
        self._read_whole = True
        self._connection.resume_reading()
        while not self._complete:
            await self._wait()
        body = b"".join(self._chunks)
        self._chunks.clear()
        self.is_closed = True
        return body

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it comes (transfer encoding removed); raises BackendFailure."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered < _PAUSE_READING_BYTES and not self._complete:
                    # (once complete, the connection may carry another request)
                    self._connection.resume_reading()
                yield chunk
            elif self._complete:
                self.is_closed = True
                return
            else:
                await self._wait()

    async def aclose(self) -> None:
        """Done with the answer: an unfinished one closes its connection, so the engine
        aborts the request (vLLM does when its client's connection closes)."""
        if not self._complete:
            self._connection.close()
            self._done()
        self.is_closed = True

    # ---- fed by the connection -------------------------------------------------------

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._timeout_s, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        what = "reading the answer" if self._headers_done else "waiting for an answer"
        self._fail(BackendFailure("timeout", f"timed out {what}"))
        self._connection.close()

    def _done(self) -> None:
        """The request no longer holds its connection (the pool's slot is free)."""
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    def _fail(self, error: BackendFailure) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        self._done()
        self._wake()

    def _body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _PAUSE_READING_BYTES and not self._read_whole:
            self._connection.pause_reading()
        self._wake()

    def _end(self) -> None:
        self._complete = True
        self._done()
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to the engine; one request at a time."""

    def __init__(self, on_idle: Callable[[_Connection], None]) -> None:
        self._on_idle = on_idle
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: EngineResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reading_paused = False
        self._length_known = False
        self._answer_started = False

    def send(self, data: bytes, response: EngineResponse) -> None:
        assert self.transport is not None
        self.response = response
        self._length_known = False
        self._answer_started = False
        self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    # ---- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # an answer nobody asked for: out of step, drop it
            self.close()
            return
        self._answer_started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.response._fail(BackendFailure("reset", f"invalid HTTP answer: {exc!r}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response, self.response = self.response, None
        if response is None or response._complete:
            return
        if response._headers_done and not self._length_known:
            response._end()  # a body that ends with the connection (no length, not chunked)
            return
        detail = repr(exc) if exc is not None else "the engine closed the connection"
        failure = BackendFailure("reset", detail)
        failure.unanswered = not self._answer_started
        response._fail(failure)

    # ---- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name, value))
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._length_known = True

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response.status_code = self._parser.get_status_code()
        self.response._headers_done = True
        self.response._wake()

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._body(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        keep_alive = self._parser.should_keep_alive()
        if response is not None:
            response._end()
        if keep_alive and not self.closed:
            # The answer is whole: a pause for its reader must not outlive it, or the
            # next request on this connection (and the engine's close) is never read.
            self.resume_reading()
            self.idle_since = time.monotonic()
            self._on_idle(self)
        else:
            self.close()


class EngineConnections:
    """Keep-alive connections to one engine (`base_url`: http or https, optionally with a
    path prefix); at most `max_connections` requests at a time, more wait."""

    def __init__(
        self,
        base_url: str,
        timeout_s: float,
        max_connections: int = 512,
        headers: dict[str, str] | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"a backend URL is http(s)://host[:port][/prefix]: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/").encode()
        self._timeout_s = timeout_s
        self._max_idle = max_connections
        fields = {"Host": url.netloc.rpartition("@")[2], **(headers or {})}
        fields["Content-Type"] = "application/json"
        self._fields = "".join(f"{k}: {v}\r\n" for k, v in fields.items()).encode("latin-1")
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []

    async def post(self, path: str, body: bytes) -> EngineResponse:
        """POST a JSON `body`; returns once the answer's head arrived. Raises
        BackendFailure.

        A request written into a reused connection that breaks before a byte of answer
        came is sent once more on a new connection: the engine closed that connection
        while it sat idle (its close was still on the way when the request went out), so
        it never read the request. Without this a lone replica answered such a request
        503; with several, the pool sent it elsewhere and counted a retry."""
        request = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%b" % (
            self._prefix + path.encode(),
            self._fields,
            len(body),
            body,
        )
        await self._acquire_slot()
        reused = self._idle_connection()
        if reused is not None:
            try:
                return await self._exchange(reused, request)
            except BackendFailure as failure:
                if failure.reason != "reset" or not failure.unanswered:
                    raise
            await self._acquire_slot()  # the failed exchange gave its slot back
        return await self._exchange(await self._connect_holding_slot(), request)

    async def _acquire_slot(self) -> None:
        if self._slots.locked():  # every connection busy: wait, as long as for an answer
            try:
                await asyncio.wait_for(self._slots.acquire(), self._timeout_s)
            except TimeoutError:
                raise BackendFailure("connect", "no free connection to the backend") from None
        else:
            await self._slots.acquire()

    async def _connect_holding_slot(self) -> _Connection:
        try:
            return await self._connect()
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(self, connection: _Connection, request: bytes) -> EngineResponse:
        """Send `request` on `connection` (holding a slot) and wait for the answer's head;
        the slot is the answer's from then on."""
        response = EngineResponse(connection, self._timeout_s, self._slots.release)
        try:
            connection.send(request, response)  # one write: one wake-up of the engine
            while not response._headers_done:
                await response._wait()
            return response
        except BaseException:
            # Failed, or cancelled (the client left) before the caller holds the answer:
            # close the connection so the engine aborts the request.
            connection.close()
            response._done()
            raise

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_EXPIRY_S:
                return connection
            connection.close()
        return None

    def _returned(self, connection: _Connection) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self._returned), self._host, self._port, ssl=self._ssl
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            raise BackendFailure("connect", repr(exc)) from None
        return connection

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
