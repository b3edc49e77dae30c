"""Server-sent events as a client must read them: lines end at LF (or CR, CRLF) only.

httpx's `iter_lines` splits like `str.splitlines`, also at U+2028, U+0085 and other
Unicode separators. vLLM writes generated text into its JSON unescaped, so a token holding
one of those (random demo adapters produce them) cut an event in two in a test that used it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator

import httpx


class _DataLines:
    """The payloads of `data:` lines in bytes that arrive in arbitrary pieces."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        normalized = (self._pending + chunk).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._pending = normalized.split(b"\n")
        return [data for line in lines if (data := _data(line)) is not None]

    def close(self) -> list[str]:
        data = _data(self._pending)
        return [] if data is None else [data]


def _data(line: bytes) -> str | None:
    return line[6:].decode() if line.startswith(b"data: ") else None


def data_events(chunks: Iterable[bytes]) -> Iterator[str]:
    """The payload of each `data:` line, as it arrives."""
    lines = _DataLines()
    for chunk in chunks:
        yield from lines.feed(chunk)
    yield from lines.close()


async def adata_events(response: httpx.Response) -> AsyncIterator[str]:
    """`data_events` of an async response."""
    lines = _DataLines()
    async for chunk in response.aiter_bytes():
        for data in lines.feed(chunk):
            yield data
    for data in lines.close():
        yield data
