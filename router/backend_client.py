"""The router's one connection pool to a vLLM OpenAI server, and the calls it makes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from loraplex.router.errors import APIError

_FORWARDED_HEADERS = {"content-type": "application/json"}


class BackendClient:
    """Talks to one vLLM server over a shared, pooled httpx client."""

    def __init__(self, base_url: str, timeout_s: float, max_connections: int = 512) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def is_healthy(self) -> bool:
        try:
            return (await self._client.get("/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def load_adapter(self, name: str, path: str) -> None:
        """Register an adapter with the backend; already registered counts as success."""
        with _mapped_backend_errors():
            response = await self._client.post(
                "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
            )
        if response.status_code == 200:
            return
        message, _ = error_detail(response.content)
        if response.status_code == 400 and "already been loaded" in message:
            return
        raise APIError(
            500,
            f"Adapter '{name}' could not be loaded: {message}",
            param="model",
            code="adapter_load_failed",
        )

    async def unload_adapter(self, name: str) -> None:
        """Unregister an adapter; one the backend does not know counts as success."""
        with _mapped_backend_errors():
            response = await self._client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code in (200, 404):
            return
        message, _ = error_detail(response.content)
        raise APIError(500, f"Adapter '{name}' could not be unloaded: {message}")

    async def send(self, path: str, body: bytes, stream: bool) -> httpx.Response:
        """Forward a request body as is; the caller closes the response when streaming."""
        request = self._client.build_request("POST", path, content=body, headers=_FORWARDED_HEADERS)
        with _mapped_backend_errors():
            return await self._client.send(request, stream=stream)


@contextmanager
def _mapped_backend_errors() -> Iterator[None]:
    """Transport failures talking to the backend become 504 (timeout) or 503 APIErrors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APIError(504, f"Backend timed out: {exc!r}", code="backend_timeout") from None
    except httpx.HTTPError as exc:
        raise APIError(503, f"Backend unavailable: {exc!r}", code="backend_unavailable") from None


def error_detail(content: bytes) -> tuple[str, str | None]:
    """(message, param) of a backend error body, OpenAI-shaped or not."""
    try:
        error = json.loads(content)["error"]
        return str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        return content[:500].decode("utf-8", errors="replace"), None
