"""The router's connection pool to one vLLM OpenAI server, and the calls it makes.

The router only forwards requests and probes `/health`: adapters are loaded by the
replica's own LoRA resolvers (serving/plugin.py) on first request, so nothing here
registers or unregisters them (docs/scaleout.md says why).
"""

from __future__ import annotations

import json
from typing import Literal

import httpx

from loraplex.router.errors import APIError

_FORWARDED_HEADERS = {"content-type": "application/json"}

FailureReason = Literal["connect", "reset", "timeout", "engine_dead"]


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

    def as_api_error(self) -> APIError:
        if self.reason == "timeout":
            return APIError(504, f"Backend timed out: {self.detail}", code="backend_timeout")
        return APIError(
            503,
            f"Backend unavailable: {self.detail}",
            code="backend_unavailable",
            headers={"Retry-After": str(self.retry_after_s)},
        )


def classify(exc: httpx.HTTPError) -> FailureReason:
    """Which kind of transport failure an httpx error is."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "reset"


class BackendClient:
    """Talks to one vLLM server over a shared, pooled httpx client."""

    def __init__(
        self, base_url: str, timeout_s: float, max_connections: int = 512, api_key: str = ""
    ) -> None:
        """`api_key`: the engine key (the backend_api_key setting), sent as a bearer token
        on every request when set."""
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def is_healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            return (await self._client.get("/health", timeout=timeout_s)).status_code == 200
        except httpx.HTTPError:
            return False

    async def get(self, path: str, timeout: httpx.Timeout) -> httpx.Response:
        """A plain GET (the backend's /metrics); httpx errors propagate."""
        return await self._client.get(path, timeout=timeout)

    async def send(self, path: str, body: bytes, stream: bool) -> httpx.Response:
        """Forward a request body as is; the caller closes the response when streaming.

        Raises BackendFailure when no HTTP answer came back.
        """
        request = self._client.build_request("POST", path, content=body, headers=_FORWARDED_HEADERS)
        try:
            return await self._client.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise BackendFailure(classify(exc), repr(exc)) from None


def error_detail(content: bytes) -> tuple[str, str | None]:
    """(message, param) of a backend error body, OpenAI-shaped or not."""
    try:
        error = json.loads(content)["error"]
        return str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        return content[:500].decode("utf-8", errors="replace"), None
