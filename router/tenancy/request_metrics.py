"""Per-request measurements taken from the response as it passes through the router.

Token counts come from the response's `usage`. For a stream the router asks vLLM for
usage on every chunk (`stream_options: {include_usage, continuous_usage_stats}`,
vllm/entrypoints/openai/*/serving.py: each chunk carries its choice's running count), so
a stream its client cuts is still counted up to the last chunk that left the router.
Usage the client did not ask for is taken out again, so clients see the stream they
requested byte for byte. Time to first token and time per output token exist only for
streams (a non-streamed answer arrives at once); the end-to-end duration is recorded
for every request.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from loraplex.router.metrics import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    REQUEST_DURATION,
    REQUESTS,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN,
    LabelLimiter,
)

Send = Callable[[dict], Awaitable[None]]

UNKNOWN_ADAPTER = "unknown"
CLIENT_CLOSED_REQUEST = 499
"""The `status` of a request whose client left before any answer (nginx's code)."""
# Error bodies are small; a non-streamed answer is bounded by max_model_len tokens.
_MAX_BODY_BYTES = 4 << 20

UsageAsked = Literal["none", "final", "every_chunk"]
"""What a streaming client asked for: no usage, vLLM's final usage chunk, or usage on
every chunk too (`continuous_usage_stats`)."""

# vLLM serializes chunks compactly (pydantic), `usage` after `choices`; its values are
# numbers and objects of numbers, nested one level (`*_tokens_details`). A quote cannot
# follow a comma unescaped inside a JSON string, so this never matches string content.
# The loop is unrolled: ~4x faster than `(?:[^{}]|\{[^{}]*\})*` on a vLLM chunk (measured).
_USAGE_FIELD = re.compile(rb',"usage":\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}')
_USAGE_KEY = b',"usage":{'


def ask_for_usage(stream_options: dict[str, Any] | None) -> tuple[dict[str, Any], UsageAsked]:
    """(`stream_options` to send vLLM, what the client asked for itself) for a stream."""
    options = stream_options or {}
    if options.get("include_usage") is not True:
        asked: UsageAsked = "none"
    elif options.get("continuous_usage_stats") is True:
        return options, "every_chunk"
    else:
        asked = "final"
    return {**options, "include_usage": True, "continuous_usage_stats": True}, asked


class ResponseObserver:
    """Wraps ASGI `send`: reads status, usage and first-token time; takes out the usage the
    router asked vLLM for and the client did not."""

    def __init__(self, stream: bool, usage_asked: UsageAsked = "every_chunk", n: int = 1) -> None:
        """`usage_asked`: what the client itself asked for (see `ask_for_usage`); `n`: its
        choices per prompt (a completions request's choice index is prompt × n + choice)."""
        self.stream = stream
        self.usage_asked = usage_asked
        self.n = max(1, n)
        self.started = time.perf_counter()
        self.status = 500
        self.complete = False
        """The response's last body message has been sent."""
        self.first_token_at: float | None = None
        self.error_param: str | None = None
        self.output_chunks = 0
        """Stream chunks that carried output (text, reasoning or tool calls)."""
        self._final: tuple[int, int] | None = None
        # Running counts from per-chunk usage: prompt tokens per prompt, completion tokens
        # per choice (vLLM's per-chunk usage counts that chunk's choice only).
        self._prompts: dict[int, int] = {}
        self._completions: dict[int, int] = {}
        self._held = b""
        self._events = bytearray()
        self._body = bytearray()
        self._passing_events = False

    @property
    def usage_seen(self) -> bool:
        return self._final is not None or bool(self._prompts)

    @property
    def prompt_tokens(self) -> int:
        return self._final[0] if self._final is not None else sum(self._prompts.values())

    @property
    def completion_tokens(self) -> int:
        """From usage; for a stream whose backend sent none, the chunks with output (each
        holds at least one token)."""
        if self._final is not None:
            return self._final[1]
        if self._completions:
            return sum(self._completions.values())
        return self.output_chunks

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def wrap(self, send: Send) -> Send:
        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                self._passing_events = self.stream and content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                more = message.get("more_body", False)
                self.complete = not more
                if self._passing_events:
                    message = {**message, "body": self._events_to_send(message["body"], more)}
                elif len(self._body) < _MAX_BODY_BYTES:
                    self._body += message.get("body", b"")
                    if not more:
                        self._read_json_body(bytes(self._body))
            await send(message)

        return observed_send

    def _events_to_send(self, chunk: bytes, more: bool) -> bytes:
        """The complete SSE events in the buffer that the client should get."""
        self._events += chunk
        kept = bytearray()
        while True:
            end, sep_len = _event_end(self._events)
            if end < 0:
                break
            event = bytes(self._events[: end + sep_len])
            del self._events[: end + sep_len]
            kept += self._observe_event(event)
        if not more:
            kept += self._release() + self._events
            self._events.clear()
        return bytes(kept)

    def _observe_event(self, event: bytes) -> bytes:
        """Record what the event tells; what of it the client gets (b"" for none yet)."""
        data = b"".join(
            line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")
        )
        if not data:
            return event
        if data == b"[DONE]":
            return self._release() + event
        try:
            chunk = json.loads(data)
        except ValueError:
            return self._release() + event
        if not isinstance(chunk, dict):
            return self._release() + event
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            choices = []
        if any(_has_output(choice) for choice in choices):
            self.output_chunks += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if not choices:  # the final usage chunk: the whole request's counts
                self._final = (_count(usage, "prompt_tokens"), _count(usage, "completion_tokens"))
                if self.usage_asked == "none":
                    return self._release(chunk.get("system_fingerprint"))
                return self._release() + event
            self._count_chunk(choices, usage)
            if self.usage_asked != "every_chunk":
                event = _without_usage(event, chunk)
        held, self._held = self._held, b""
        if self.usage_asked == "none" and any(_finished(choice) for choice in choices):
            # vLLM stamps `system_fingerprint` on a finishing chunk only when no usage chunk
            # follows; with the one the router asked for, the fingerprint rides on that.
            # Hold the finishing chunk until it comes (the next event, for one choice).
            self._held = event
            return held
        return held + event

    def _release(self, fingerprint: object = None) -> bytes:
        """The held finishing chunk, with vLLM's `system_fingerprint` when one is given."""
        held, self._held = self._held, b""
        if held and isinstance(fingerprint, str):
            close = held.rfind(b"}")
            stamp = b',"system_fingerprint":' + json.dumps(fingerprint).encode()
            held = held[:close] + stamp + held[close:]
        return held

    def _count_chunk(self, choices: list, usage: dict) -> None:
        first = choices[0] if isinstance(choices[0], dict) else {}
        index = first.get("index", 0) if len(choices) == 1 else 0
        index = index if isinstance(index, int) and index >= 0 else 0
        self._prompts[index // self.n] = _count(usage, "prompt_tokens")
        self._completions[index] = _count(usage, "completion_tokens")

    def _read_json_body(self, body: bytes) -> None:
        try:
            payload = json.loads(body)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self._final = (_count(usage, "prompt_tokens"), _count(usage, "completion_tokens"))
        error = payload.get("error")
        if isinstance(error, dict):
            self.error_param = error.get("param")


def _count(usage: dict, field: str) -> int:
    value = usage.get(field)
    return value if isinstance(value, int) and value > 0 else 0


def _without_usage(event: bytes, chunk: dict) -> bytes:
    """The event without its chunk's `usage`: cut out of vLLM's bytes (no re-encoding, so
    the rest is exactly what vLLM sent), or re-encoded for another backend's formatting."""
    found = _USAGE_FIELD.search(event, max(0, event.rfind(_USAGE_KEY)))
    if found is not None:
        return event[: found.start()] + event[found.end() :]
    rest = {key: value for key, value in chunk.items() if key != "usage"}
    data = json.dumps(rest, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + data.encode() + b"\n\n"


def _event_end(buffer: bytearray) -> tuple[int, int]:
    """Index and length of the first event separator (blank line), or (-1, 0)."""
    found = [(i, len(sep)) for sep in (b"\n\n", b"\r\n\r\n") if (i := buffer.find(sep)) >= 0]
    return min(found) if found else (-1, 0)


def _has_output(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(
        delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
    )


def _finished(choice: Any) -> bool:
    return isinstance(choice, dict) and choice.get("finish_reason") is not None


class RequestMetrics:
    """Records one finished request in the Prometheus metrics with bounded labels.

    An adapter name becomes a label value only once the router accepted it (the request
    reached the endpoint and was not refused for its `model`), so requests for made-up
    names cannot use up the label budget: they count under adapter="unknown".
    """

    def __init__(self, max_label_values: int, base_model_name: str) -> None:
        self.adapters = LabelLimiter("adapter", max_label_values)
        self.tenants = LabelLimiter("tenant", max_label_values)
        self.adapters(base_model_name)

    def provisional_adapter_label(self, adapter: str) -> str:
        """A label before the outcome is known (for the in-flight gauge)."""
        return adapter if self.adapters.known(adapter) else UNKNOWN_ADAPTER

    def tenant_label(self, tenant: str) -> str:
        return self.tenants(tenant)

    def record(
        self, adapter: str | None, tenant: str, observer: ResponseObserver, reached_app: bool
    ) -> None:
        status = observer.status
        # `reached_app`: the route resolved the name (it exists, the caller may use it), so
        # its own failures count under it too: a 500 when the engine cannot load it.
        accepted = reached_app
        if adapter is None:
            adapter_label = UNKNOWN_ADAPTER
        elif accepted:
            adapter_label = self.adapters(adapter)
        else:
            adapter_label = self.provisional_adapter_label(adapter)
        tenant_label = self.tenants(tenant)
        REQUESTS.labels(adapter_label, tenant_label, str(status)).inc()
        REQUEST_DURATION.labels(adapter_label, tenant_label).observe(
            time.perf_counter() - observer.started
        )
        if status >= 400:
            return
        if observer.prompt_tokens:
            PROMPT_TOKENS.labels(adapter_label, tenant_label).inc(observer.prompt_tokens)
        if observer.completion_tokens:
            COMPLETION_TOKENS.labels(adapter_label, tenant_label).inc(observer.completion_tokens)
        if observer.first_token_at is not None:
            TIME_TO_FIRST_TOKEN.labels(adapter_label, tenant_label).observe(
                observer.first_token_at - observer.started
            )
            if observer.completion_tokens > 1:
                TIME_PER_OUTPUT_TOKEN.labels(adapter_label, tenant_label).observe(
                    (time.perf_counter() - observer.first_token_at)
                    / (observer.completion_tokens - 1)
                )
