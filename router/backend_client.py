"""The router's one connection pool to a vLLM OpenAI server, and the calls it makes."""

from __future__ import annotations

import json

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
        response = await self._request(
            "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
        )
        if response.status_code == 200:
            return
        message = error_message(response)
        if response.status_code == 400 and "already been loaded" in message:
            return
        raise APIError(
            500, f"Adapter '{name}' could not be loaded: {message}", param="model",
            code="adapter_load_failed",
        )  # fmt: skip

    async def send(self, path: str, body: bytes, stream: bool) -> httpx.Response:
        """Forward a request body as is; the caller closes the response when streaming."""
        request = self._client.build_request("POST", path, content=body, headers=_FORWARDED_HEADERS)
        try:
            return await self._client.send(request, stream=stream)
        except httpx.TimeoutException as exc:
            raise APIError(504, f"Backend timed out: {exc!r}", code="backend_timeout") from None
        except httpx.HTTPError as exc:
            raise APIError(
                503, f"Backend unavailable: {exc!r}", code="backend_unavailable"
            ) from None

    async def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise APIError(
                503, f"Backend unavailable: {exc!r}", code="backend_unavailable"
            ) from None


def error_message(response: httpx.Response) -> str:
    """The human message inside a backend error response (OpenAI shape or not)."""
    try:
        payload = response.json()
    except json.JSONDecodeError:
        return response.text[:500]
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message", payload))
    return str(payload)[:500]
