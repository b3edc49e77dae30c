"""Server-sent events as a client must read them: lines end at LF (or CR, CRLF) only.

httpx's `iter_lines` splits like `str.splitlines`, also at U+2028, U+0085 and other
Unicode separators. vLLM writes generated text into its JSON unescaped, so a token holding
one of those (random demo adapters produce them) cut an event in two in a test that used it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator

import httpx


def _split(pending: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines in `pending` (without their endings) and the unfinished rest."""
    normalized = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    *lines, rest = normalized.split(b"\n")
    return lines, rest


def _data(line: bytes) -> str | None:
    return line[6:].decode() if line.startswith(b"data: ") else None


def data_events(chunks: Iterable[bytes]) -> Iterator[str]:
    """The payload of each `data:` line, as it arrives."""
    pending = b""
    for chunk in chunks:
        lines, pending = _split(pending + chunk)
        for line in lines:
            if (data := _data(line)) is not None:
                yield data
    if (data := _data(pending)) is not None:
        yield data


async def adata_events(response: httpx.Response) -> AsyncIterator[str]:
    """`data_events` of an async response."""
    pending = b""
    async for chunk in response.aiter_bytes():
        lines, pending = _split(pending + chunk)
        for line in lines:
            if (data := _data(line)) is not None:
                yield data
    if (data := _data(pending)) is not None:
        yield data
