"""The stream observer: usage read from every chunk (so a cut stream is still counted),
the usage the client did not ask for taken out so it gets vLLM's stream byte for byte,
whatever the chunk boundaries; first-token time set by the first chunk with text.

The events are built the way vLLM serializes them (pydantic's compact JSON, fields in
the order of ChatCompletionStreamResponse: id, object, created, model, choices, usage,
system_fingerprint), once as vLLM streams with the router's options and once as it would
stream with the client's own."""

from __future__ import annotations

import asyncio
import json

import pytest

from loraplex.router.tenancy.request_metrics import ResponseObserver, UsageAsked, ask_for_usage

FINGERPRINT = "fp_0123456789"
PROMPT = 31


def _chunk(choices: list[dict], usage: dict | None = None, fingerprint: str | None = None) -> bytes:
    payload: dict = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
    }
    if usage is not None:
        payload["usage"] = usage
    if fingerprint is not None:
        payload["system_fingerprint"] = fingerprint
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _usage(completion: int) -> dict:
    return {
        "prompt_tokens": PROMPT,
        "total_tokens": PROMPT + completion,
        "completion_tokens": completion,
    }


def _stream(mode: UsageAsked | None, words: list[str], index: int = 0) -> list[bytes]:
    """One choice's events as vLLM sends them for stream_options `mode` (None: the router's
    own options, usage on every chunk)."""
    every = mode in (None, "every_chunk")
    final = mode != "none"
    events = [
        _chunk(
            [{"index": index, "delta": {"role": "assistant", "content": ""}}],
            _usage(0) if every else None,
        )
    ]
    for count, word in enumerate(words, 1):
        finish = "length" if count == len(words) else None
        choice = {"index": index, "delta": {"content": word}, "finish_reason": finish}
        # vLLM stamps the fingerprint on a finishing chunk only when no usage chunk follows.
        stamp = FINGERPRINT if finish and not final else None
        events.append(_chunk([choice], _usage(count) if every else None, stamp))
    if final:
        events.append(_chunk([], _usage(len(words)), FINGERPRINT))
    return events


DONE = b"data: [DONE]\n\n"
WORDS = ["The", " capital", " is", " Paris"]


async def _replay(observer: ResponseObserver, pieces: list[bytes], complete: bool = True) -> bytes:
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
        more = not complete or i < len(pieces) - 1
        await wrapped({"type": "http.response.body", "body": piece, "more_body": more})
    return b"".join(sent)


def _pieces(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
@pytest.mark.parametrize("asked", ["none", "final", "every_chunk"])
def test_client_gets_vllms_stream_for_its_own_options(size: int, asked: UsageAsked) -> None:
    routed = b"".join(_stream(None, WORDS)) + DONE
    direct = b"".join(_stream(asked, WORDS)) + DONE
    observer = ResponseObserver(stream=True, usage_asked=asked)
    assert asyncio.run(_replay(observer, _pieces(routed, size))) == direct
    assert (observer.prompt_tokens, observer.completion_tokens) == (PROMPT, len(WORDS))
    assert observer.first_token_at is not None and observer.first_token_at >= observer.started


@pytest.mark.parametrize("asked", ["none", "final"])
def test_cut_stream_is_counted_up_to_its_last_chunk(asked: UsageAsked) -> None:
    events = _stream(None, WORDS)[:3]  # role, "The", " capital": then the client left
    observer = ResponseObserver(stream=True, usage_asked=asked)
    out = asyncio.run(_replay(observer, events, complete=False))
    assert b"usage" not in out
    assert observer.usage_seen
    assert (observer.prompt_tokens, observer.completion_tokens) == (PROMPT, 2)


def test_n_choices_are_summed_and_the_prompt_counted_once() -> None:
    first, second = _stream(None, WORDS, index=0)[:-1], _stream(None, WORDS[:2], index=1)[:-1]
    # Cut after three events of each: role + 2 tokens per choice.
    interleaved = [event for pair in zip(first, second, strict=False) for event in pair]
    observer = ResponseObserver(stream=True, usage_asked="none", n=2)
    asyncio.run(_replay(observer, interleaved, complete=False))
    assert (observer.prompt_tokens, observer.completion_tokens) == (PROMPT, 2 + 2)


def test_final_usage_chunk_is_the_whole_count() -> None:
    observer = ResponseObserver(stream=True, usage_asked="final", n=2)
    asyncio.run(_replay(observer, [_chunk([], _usage(40)), DONE]))
    assert observer.total_tokens == PROMPT + 40


def test_backend_without_usage_is_counted_by_chunks_with_output() -> None:
    events = _stream("none", WORDS)
    observer = ResponseObserver(stream=True, usage_asked="none")
    assert asyncio.run(_replay(observer, [*events, DONE])) == b"".join(events) + DONE
    assert not observer.usage_seen
    assert (observer.prompt_tokens, observer.completion_tokens) == (0, len(WORDS))


def test_other_formatting_is_re_encoded_without_usage() -> None:
    spaced = b'data: {"choices": [{"index": 0, "text": "x"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}\n\n'
    observer = ResponseObserver(stream=True, usage_asked="final")
    out = asyncio.run(_replay(observer, [spaced]))
    assert json.loads(out.removeprefix(b"data: ")) == {"choices": [{"index": 0, "text": "x"}]}
    assert observer.total_tokens == 3


def test_role_only_chunk_is_not_the_first_token() -> None:
    observer = ResponseObserver(stream=True, usage_asked="none")
    asyncio.run(_replay(observer, _stream(None, WORDS)[:1], complete=False))
    assert observer.first_token_at is None


def test_non_streamed_body_gives_usage_and_error_param() -> None:
    observer = ResponseObserver(stream=False)
    body = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    assert asyncio.run(_replay(observer, [body[:5], body[5:]])) == body
    assert observer.total_tokens == 7
    assert observer.complete
    error = ResponseObserver(stream=False)
    asyncio.run(_replay(error, [b'{"error": {"message": "x", "param": "model"}}']))
    assert error.error_param == "model"


ASK_CASES = [
    # (client's stream_options, forwarded, what the client asked for)
    (None, {"include_usage": True, "continuous_usage_stats": True}, "none"),
    (
        {"include_usage": False, "continuous_usage_stats": True},
        {"include_usage": True, "continuous_usage_stats": True},
        "none",
    ),
    ({"include_usage": True}, {"include_usage": True, "continuous_usage_stats": True}, "final"),
    (
        {"include_usage": True, "continuous_usage_stats": True},
        {"include_usage": True, "continuous_usage_stats": True},
        "every_chunk",
    ),
]


@pytest.mark.parametrize(("options", "forwarded", "asked"), ASK_CASES)
def test_ask_for_usage_asks_for_every_chunk_and_remembers_the_clients_choice(
    options: dict | None, forwarded: dict, asked: str
) -> None:
    assert ask_for_usage(options) == (forwarded, asked)
