"""Per-version observability: which adapter version served a request, in a response header
and in metrics that compare a canary with its incumbent.

`VersionMiddleware` sits inside the API guard (it sees the stream with the usage chunk
the guard asked vLLM for) and around the completion endpoints, which put the version
they resolved in `request.state.served_adapter`. For every request that reached a
registry version it:
- adds `x-loraplex-adapter-version: vN` to the answer (errors included; the body's
  `model` stays the name the client sent);
- counts it in `loraplex_version_*` with the labels adapter, alias, version and role
  (`single`, or `incumbent` / `canary` in a weighted alias);
- hands guarded aliases' outcomes to the rollback guard (router/rollout.py) before the
  answer leaves, so a rollback applies from the next request on.

Label values are bounded like `adapter` in router/metrics.py: the first
`max_label_values` (adapter, alias, version) triples keep their own series, later ones
count as `other`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import Counter, Histogram

from loraplex.router.metrics import OVERFLOW_LABEL, LabelLimiter

if TYPE_CHECKING:  # rollout.py imports this module's metrics
    from loraplex.router.adapter_loading import ServedAdapter
    from loraplex.router.rollout import RolloutGuardian

VERSION_HEADER = "x-loraplex-adapter-version"
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_LABELS = ["adapter", "alias", "version", "role"]
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_MAX_BODY_BYTES = 4 << 20

VERSION_REQUESTS = Counter(
    "loraplex_version_requests",
    "Completed requests served by a registry adapter version, by HTTP status. `alias` is the "
    "alias the client named (`latest` for a plain name, `none` for name:vN); `role` is "
    "`single`, or `incumbent` / `canary` in a weighted alias.",
    [*_LABELS, "status"],
)
VERSION_PROMPT_TOKENS = Counter(
    "loraplex_version_prompt_tokens", "Prompt tokens processed, by adapter version.", _LABELS
)
VERSION_COMPLETION_TOKENS = Counter(
    "loraplex_version_completion_tokens",
    "Completion tokens generated, by adapter version.",
    _LABELS,
)
VERSION_TIME_TO_FIRST_TOKEN = Histogram(
    "loraplex_version_time_to_first_token_seconds",
    "Time from request to the first output token of a stream, by adapter version.",
    _LABELS,
    buckets=_LATENCY_BUCKETS,
)
ROLLOUT_ROLLBACKS = Counter(
    "loraplex_rollout_rollbacks",
    "Weighted aliases moved back to their incumbent alone by their rollback guard, by why "
    "(error_rate: the canary's server-error rate exceeded the incumbent's by the guard's "
    "factor).",
    ["adapter", "alias", "reason"],
)

Send = Callable[[dict], Awaitable[None]]


class VersionLabels:
    """Bounded (adapter, alias, version) label values."""

    def __init__(self, max_values: int) -> None:
        self._triples = LabelLimiter("adapter version", max_values)
        self._pairs = LabelLimiter("adapter alias", max_values)

    def version(self, adapter: ServedAdapter) -> list[str]:
        alias = adapter.alias or "none"
        version = f"v{adapter.version}"
        if self._triples(f"{adapter.name}@{alias}:{version}") == OVERFLOW_LABEL:
            return [OVERFLOW_LABEL, OVERFLOW_LABEL, OVERFLOW_LABEL, adapter.role]
        return [str(adapter.name), alias, version, adapter.role]

    def adapter_alias(self, adapter: str, alias: str) -> tuple[str, str]:
        if self._pairs(f"{adapter}@{alias}") == OVERFLOW_LABEL:
            return OVERFLOW_LABEL, OVERFLOW_LABEL
        return adapter, alias


class VersionMiddleware:
    def __init__(
        self, app: Any, *, labels: VersionLabels, guardian: RolloutGuardian | None = None
    ) -> None:
        self.app = app
        self.labels = labels
        self.guardian = guardian

    async def __call__(self, scope: dict, receive: Any, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in COMPLETION_PATHS:
            await self.app(scope, receive, send)
            return
        seen = _Answer()

        async def observed_send(message: dict) -> None:
            adapter = _served(scope)
            if message["type"] == "http.response.start":
                seen.status = message["status"]
                headers = list(message.get("headers", []))
                seen.events = (
                    dict(headers).get(b"content-type", b"").startswith(b"text/event-stream")
                )
                if adapter is not None:
                    headers.append((VERSION_HEADER.encode(), f"v{adapter.version}".encode()))
                    message = {**message, "headers": headers}
                    # Client errors (4xx) say nothing about the version: not counted.
                    client_error = 400 <= seen.status < 500
                    if adapter.guarded and self.guardian is not None and not client_error:
                        with anyio.CancelScope(shield=True):
                            await self.guardian.record(adapter, seen.status >= 500)
            elif message["type"] == "http.response.body" and adapter is not None:
                seen.read(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            adapter = _served(scope)
            if adapter is not None and seen.status is not None:
                self._count(adapter, seen)

    def _count(self, adapter: ServedAdapter, seen: _Answer) -> None:
        labels = self.labels.version(adapter)
        VERSION_REQUESTS.labels(*labels, str(seen.status)).inc()
        if seen.status >= 400:
            return
        seen.finish()
        if seen.prompt_tokens:
            VERSION_PROMPT_TOKENS.labels(*labels).inc(seen.prompt_tokens)
        if seen.completion_tokens:
            VERSION_COMPLETION_TOKENS.labels(*labels).inc(seen.completion_tokens)
        if seen.first_token_at is not None:
            VERSION_TIME_TO_FIRST_TOKEN.labels(*labels).observe(seen.first_token_at - seen.started)


def _served(scope: dict) -> ServedAdapter | None:
    adapter = scope.get("state", {}).get("served_adapter")
    return adapter if adapter is not None and adapter.version is not None else None


class _Answer:
    """What the answer showed: status, usage, and (streams) when the first token came."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.status: int | None = None
        self.events = False
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._buffer = bytearray()

    def read(self, chunk: bytes) -> None:
        if not self.events:
            if len(self._buffer) < _MAX_BODY_BYTES:
                self._buffer += chunk
            return
        self._buffer += chunk
        # Whole lines only: an event split across chunks is read once complete.
        cut = self._buffer.rfind(b"\n") + 1
        lines, self._buffer = bytes(self._buffer[:cut]), self._buffer[cut:]
        for line in lines.splitlines():
            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                self._read_payload(line[5:])

    def finish(self) -> None:
        if not self.events and self._buffer:
            self._read_payload(bytes(self._buffer))

    def _read_payload(self, data: bytes) -> None:
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        if self.events and self.first_token_at is None and _has_output(payload):
            self.first_token_at = time.perf_counter()
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)


def _has_output(payload: dict) -> bool:
    for choice in payload.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if choice.get("text") or (isinstance(delta, dict) and delta.get("content")):
            return True
    return False
