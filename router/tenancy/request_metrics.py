"""Per-request measurements taken from the response as it passes through the router.

Token counts come from the response's `usage`. For a stream the router asks vLLM for a
final usage chunk (`stream_options.include_usage`) and removes that chunk again when
the client did not ask for it, so clients see the stream they requested. Time to first
token and time per output token exist only for streams (a non-streamed answer arrives
at once); the end-to-end duration is recorded for every request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

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
# Error bodies are small; a non-streamed answer is bounded by max_model_len tokens.
_MAX_BODY_BYTES = 4 << 20


def ask_for_usage(request: dict) -> tuple[dict, bool]:
    """(body to forward, whether the client asked for usage itself) for a stream request."""
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return request, True
    return {**request, "stream_options": {**(options or {}), "include_usage": True}}, False


class ResponseObserver:
    """Wraps ASGI `send`: reads status, usage and first-token time; drops the usage chunk
    the router added."""

    def __init__(self, stream: bool, drop_usage_chunk: bool) -> None:
        self.stream = stream
        self.drop_usage_chunk = drop_usage_chunk
        self.started = time.perf_counter()
        self.status = 500
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.error_param: str | None = None
        self._events = bytearray()
        self._body = bytearray()
        self._passing_events = False

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
            if self._observe_event(event):
                kept += event
        if not more:
            kept += self._events
            self._events.clear()
        return bytes(kept)

    def _observe_event(self, event: bytes) -> bool:
        """Record what the event tells; False when it is the usage chunk to drop."""
        data = b"".join(
            line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")
        )
        if not data or data == b"[DONE]":
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            return True
        if not isinstance(chunk, dict):
            return True
        choices = chunk.get("choices") or []
        if self.first_token_at is None and any(_has_output(choice) for choice in choices):
            self.first_token_at = time.perf_counter()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._read_usage(usage)
            if self.drop_usage_chunk and not choices:
                return False
        return True

    def _read_json_body(self, body: bytes) -> None:
        try:
            payload = json.loads(body)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        if isinstance(payload.get("usage"), dict):
            self._read_usage(payload["usage"])
        error = payload.get("error")
        if isinstance(error, dict):
            self.error_param = error.get("param")

    def _read_usage(self, usage: dict) -> None:
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)


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
        accepted = reached_app and status != 404 and observer.error_param != "model"
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
