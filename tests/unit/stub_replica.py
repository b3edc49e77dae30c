"""A stand-in vLLM replica for router tests: a real HTTP/1.1 server on a loopback port
whose way of failing is chosen per test.

Raw asyncio rather than FastAPI/uvicorn, because the failures the router must survive
are below HTTP: a connection reset before any answer, headers followed by nothing, a
stream cut after its first event. Every answer says which replica gave it (the
completion text is the replica's name), and every completion request is recorded.

Modes (`replica.mode`):
- "ok": a completion (stream or not) with usage 3 + 4 tokens;
- "status:NNN": an OpenAI-shaped error with that status;
- "reset": the connection is reset before any answer;
- "headers-only": a streamed 200 whose connection is reset before the first byte of body;
- "break": the first event of the answer, then a reset;
- "engine-dead": what vLLM answers when its engine core dies: a 500 with its
  EngineDeadError message, or for a stream that error as the first event.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.unit.registry_helpers import free_port

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
# vllm/v1/engine/exceptions.py EngineDeadError
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."


class StubReplica:
    def __init__(self, name: str, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port or free_port()
        self.mode = "ok"
        self.healthy = True
        self.event_delay_s = 0.0
        """Pause before each streamed event (a slow engine)."""
        self.requests: list[str] = []
        """`model` of every completion request, in order."""
        self.metrics_text = f'# HELP vllm:up Up.\n# TYPE vllm:up gauge\nvllm:up{{r="{name}"}} 1\n'
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- lifecycle (from the test's thread) ----------------------------------------------

    def start(self) -> StubReplica:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                self._server = await asyncio.start_server(self._handle, self.host, self.port)
                started.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(10), "stub replica did not start"
        return self

    def stop(self) -> None:
        """Stop listening and reset every open connection (like a killed process)."""
        if self._loop is None or self._thread is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None
        self._thread = None

    # ---- HTTP ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "GET" and path == "/health":
                await self._respond(writer, 200 if self.healthy else 503, b"{}")
            elif method == "GET" and path == "/metrics":
                await self._respond(writer, 200, self.metrics_text.encode(), "text/plain")
            elif method == "POST":
                await self._complete(writer, json.loads(body))
            else:
                await self._respond(writer, 404, b'{"error": {"message": "no route"}}')
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _complete(self, writer: asyncio.StreamWriter, request: dict) -> None:
        model = request["model"]
        self.requests.append(model)
        mode = self.mode
        if mode == "reset":
            writer.transport.abort()
            return
        if mode.startswith("status:"):
            status = int(mode.split(":")[1])
            error = {"error": {"message": f"{self.name} says {status}", "type": "X"}}
            await self._respond(writer, status, json.dumps(error).encode())
            return
        dead = {"error": {"message": ENGINE_DEAD, "type": "InternalServerError", "code": 500}}
        if mode == "engine-dead" and not request.get("stream"):
            await self._respond(writer, 500, json.dumps(dead).encode())
            return
        if not request.get("stream"):
            answer = {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": model,
                "choices": [{"index": 0, "text": self.name, "finish_reason": "length"}],
                "usage": USAGE,
            }
            await self._respond(writer, 200, json.dumps(answer).encode())
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        await writer.drain()
        if mode == "headers-only":
            await asyncio.sleep(0.05)
            writer.transport.abort()
            return
        if mode == "engine-dead":
            await self._chunk(writer, b"data: " + json.dumps(dead).encode() + b"\n\n")
            await self._chunk(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        events = [
            {"model": model, "choices": [{"index": 0, "text": self.name}]},
            {"model": model, "choices": [{"index": 0, "text": "!"}]},
            {"model": model, "choices": [], "usage": USAGE},
        ]
        for number, event in enumerate(events):
            await asyncio.sleep(self.event_delay_s)
            await self._chunk(writer, b"data: " + json.dumps(event).encode() + b"\n\n")
            if mode == "break" and number == 0:
                await asyncio.sleep(0.05)
                writer.transport.abort()
                return
        await self._chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "application/json",
    ) -> None:
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()


@contextmanager
def stub_replicas(*names: str) -> Iterator[list[StubReplica]]:
    """Started replicas, stopped at the end whatever happens."""
    replicas = [StubReplica(name).start() for name in names]
    try:
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
