"""The `model` field between client and backend: the version id goes to the backend,
the client's own name comes back.

The backend answers with the immutable version id (`lpx-<sha256>`) the router
forwarded; clients that compare `response.model` with what they asked for
(SDKs, eval harnesses) should see `acme/bot@stable`. The id is a unique quoted
string, so a byte replacement is exact and cheap; streams are rewritten line by
line so an id split across network chunks is still found.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator


def _needle(backend_name: str, client_name: str) -> tuple[bytes, bytes]:
    return json.dumps(backend_name).encode(), json.dumps(client_name).encode()


def request_with_model(body: bytes, backend_name: str, client_name: str) -> bytes:
    """The request body with `model` set to the name the backend knows the adapter by."""
    if backend_name == client_name:
        return body  # forwarded byte for byte, as before the registry
    payload = json.loads(body)
    payload["model"] = backend_name
    return json.dumps(payload, ensure_ascii=False).encode()


def rename_model(content: bytes, backend_name: str, client_name: str) -> bytes:
    if backend_name == client_name:
        return content
    old, new = _needle(backend_name, client_name)
    return content.replace(old, new)


async def rename_model_stream(
    chunks: AsyncIterator[bytes], backend_name: str, client_name: str
) -> AsyncIterator[bytes]:
    if backend_name == client_name:
        async for chunk in chunks:
            yield chunk
        return
    old, new = _needle(backend_name, client_name)
    pending = b""
    async for chunk in chunks:
        pending += chunk
        cut = pending.rfind(b"\n") + 1
        if cut:
            yield pending[:cut].replace(old, new)
            pending = pending[cut:]
    if pending:
        yield pending.replace(old, new)
