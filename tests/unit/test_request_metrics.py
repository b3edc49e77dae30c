"""The stream observer: usage read and the router's own usage chunk removed, whatever the
chunk boundaries; first-token time set by the first chunk with text."""

from __future__ import annotations

import asyncio
import json

import pytest

from loraplex.router.tenancy.request_metrics import ResponseObserver, ask_for_usage


def _event(payload: object) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


ROLE = _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TEXT = _event({"choices": [{"index": 0, "delta": {"content": "Paris"}}]})
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 7}})
DONE = b"data: [DONE]\n\n"
STREAM = ROLE + TEXT + USAGE + DONE


async def _replay(observer: ResponseObserver, pieces: list[bytes]) -> bytes:
    sent: list[bytes] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])

    wrapped = observer.wrap(send)
    await wrapped(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
        }
    )
    for i, piece in enumerate(pieces):
        await wrapped(
            {"type": "http.response.body", "body": piece, "more_body": i < len(pieces) - 1}
        )
    return b"".join(sent)


@pytest.mark.parametrize("size", [1, 7, 64, len(STREAM)])
@pytest.mark.parametrize("drop", [True, False])
def test_usage_read_and_dropped_at_any_chunk_boundary(size: int, drop: bool) -> None:
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    observer = ResponseObserver(stream=True, drop_usage_chunk=drop)
    out = asyncio.run(_replay(observer, pieces))
    assert out == (ROLE + TEXT + DONE if drop else STREAM)
    assert (observer.prompt_tokens, observer.completion_tokens) == (31, 7)
    assert observer.first_token_at is not None and observer.first_token_at >= observer.started


def test_role_only_chunk_is_not_the_first_token() -> None:
    observer = ResponseObserver(stream=True, drop_usage_chunk=True)
    asyncio.run(_replay(observer, [ROLE]))
    assert observer.first_token_at is None


def test_non_streamed_body_gives_usage_and_error_param() -> None:
    observer = ResponseObserver(stream=False, drop_usage_chunk=False)
    body = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    assert asyncio.run(_replay(observer, [body[:5], body[5:]])) == body
    assert observer.total_tokens == 7
    error = ResponseObserver(stream=False, drop_usage_chunk=False)
    asyncio.run(_replay(error, [b'{"error": {"message": "x", "param": "model"}}']))
    assert error.error_param == "model"


def test_ask_for_usage_keeps_the_clients_choice() -> None:
    assert ask_for_usage({"stream": True}) == (
        {"stream": True, "stream_options": {"include_usage": True}},
        False,
    )
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    assert ask_for_usage(asked) == (asked, True)
