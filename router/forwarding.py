"""Forward one completion request to a replica, and to a second one when the first fails.

- The replica comes from the picker (router/picker.py) over the pool's admitted replicas.
- Failover: a request whose replica gave no answer (connect error, reset) or a 502/503
  (a dying engine) is sent once more to another replica, if the retry budget allows.
  Never retried: 4xx (the request is at fault), 504 and read timeouts (the request may
  have run), a stream after its first byte (the client has part of an answer).
- A stream is read up to its first chunk before the client gets anything, so a replica
  that dies before answering is still failed over; one that breaks later ends the
  client's stream with an OpenAI-shaped error event and `data: [DONE]`.
- One request, one charge: the quota guard (router/tenancy/guard.py) wraps the whole
  endpoint, so every attempt here is inside one admission and one settlement.
- A client that leaves cancels the attempt (the guard stops the endpoint): the backend
  response is closed even then, and vLLM aborts a request whose connection closes.
- Loads: the replica's resolvers load an adapter on its first request. The router counts
  a load (`loraplex_adapter_loads_total`) when it sends an adapter to a replica whose
  record does not hold it; a 404 for a resolved adapter is explained by the registry
  (router/adapter_loading.py `diagnose`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import get_args

import anyio
from fastapi.responses import Response, StreamingResponse

from loraplex.router.adapter_loading import AdapterResolver, ServedAdapter
from loraplex.router.backend_client import BackendFailure, EngineResponse, error_detail
from loraplex.router.backend_pool import BackendPool, Replica
from loraplex.router.errors import APIError, error_body
from loraplex.router.metrics import (
    ADAPTER_LOAD_DURATION,
    ADAPTER_LOADS,
    BACKEND_RETRIES,
    PICKER_DECISIONS,
    RETRY_BUDGET_EXHAUSTED,
    STREAM_INTERRUPTIONS,
    LabelLimiter,
)
from loraplex.router.model_rewrite import rename_model, rename_model_stream
from loraplex.router.picker import (
    AdapterAwarePicker,
    DecisionKind,
    NoReplica,
    RoundRobinPicker,
)
from loraplex.router.retry_budget import RetryBudget
from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)

_RETRIED_STATUSES = frozenset({502, 503})
_DYING_ENGINE_STATUSES = frozenset({502, 503, 504})
# vLLM answers the requests in flight when its engine core dies with a 500 carrying this
# message (vllm/v1/engine/exceptions.py EngineDeadError), then its API server exits: no
# answer was produced, so the request is retried like a 503 (seen with kill -9 of the core),
# and where no other replica can take it the client gets a 503 with Retry-After.
_ENGINE_DEAD_MESSAGE = b"EngineCore encountered an issue"
_EVENT_END = b"\n\n"
_DONE = b"data: [DONE]"


@dataclass(frozen=True)
class Call:
    """One request as the router forwards it."""

    path: str
    body: bytes
    """With `model` already set to the name the backend knows."""
    stream: bool
    adapter: ServedAdapter | None
    backend_name: str
    """`model` as the backend knows it (the version id for registry adapters)."""
    client_name: str
    """`model` as the client sent it."""


@dataclass(frozen=True)
class _Failed:
    """An attempt that got no usable answer."""

    reason: str
    """The `reason` label of loraplex_backend_retries_total."""
    retryable: bool
    error: APIError


class Forwarder:
    def __init__(
        self,
        pool: BackendPool,
        picker: AdapterAwarePicker | RoundRobinPicker,
        resolver: AdapterResolver,
        budget: RetryBudget,
        retry_after_s: int = 4,
        max_adapter_labels: int = 200,
    ) -> None:
        self.pool = pool
        self.picker = picker
        self.resolver = resolver
        self.budget = budget
        self.retry_after_s = retry_after_s
        self._adapter_label = LabelLimiter("adapter", max_adapter_labels)
        # The counter's children, looked up once (labels() takes a lock on every call).
        self._decisions = {kind: PICKER_DECISIONS.labels(kind) for kind in get_args(DecisionKind)}

    @classmethod
    def from_settings(
        cls, settings: ServeSettings, pool: BackendPool, resolver: AdapterResolver
    ) -> Forwarder:
        picker: AdapterAwarePicker | RoundRobinPicker
        if settings.picker == "round-robin":
            picker = RoundRobinPicker()
        else:
            picker = AdapterAwarePicker(
                settings.picker_load_factor, settings.picker_spill_in_flight
            )
        # A replica comes back no sooner than its re-admission probes.
        retry_after_s = max(
            1, math.ceil(settings.readmit_after_successes * settings.health_check_interval_s)
        )
        return cls(
            pool,
            picker,
            resolver,
            RetryBudget(settings.retry_budget_ratio),
            retry_after_s,
            settings.metrics_max_label_values,
        )

    def no_replica_error(self) -> APIError:
        return APIError(
            503,
            "No backend replica is available; retry shortly.",
            code="backend_unavailable",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def _pick(self, adapter_id: str | None, tried: frozenset[str]) -> Replica:
        up = self.pool.up()
        in_flight = self.pool.adapter_in_flight(adapter_id) if adapter_id is not None else 0
        decision = self.picker.pick(adapter_id, [r.state() for r in up], in_flight, tried)
        self._decisions[decision.kind].inc()
        return self.pool.get(decision.replica)

    async def forward(self, call: Call) -> Response:
        """The backend's answer for the client, or an APIError."""
        self.budget.record_request()
        adapter_id = call.adapter.id if call.adapter is not None else None
        tried: frozenset[str] = frozenset()
        while True:
            try:
                replica = self._pick(adapter_id, tried)
            except NoReplica:
                raise self.no_replica_error() from None
            result = await self._attempt(replica, call)
            if isinstance(result, Response):
                return result
            if not result.retryable or tried:
                raise result.error
            tried = frozenset({replica.url})
            if not any(r.url not in tried for r in self.pool.up()):
                raise result.error  # nowhere else to go; no budget spent
            if not self.budget.try_spend():
                RETRY_BUDGET_EXHAUSTED.inc()
                log.warning("retry budget exhausted", extra={"backend": replica.url})
                raise result.error
            BACKEND_RETRIES.labels(result.reason).inc()
            log.warning(
                "retrying on another backend",
                extra={"backend": replica.url, "reason": result.reason},
            )

    async def _attempt(self, replica: Replica, call: Call) -> Response | _Failed:
        adapter_id = call.adapter.id if call.adapter is not None else None
        loading = adapter_id is not None and replica.held.claim(adapter_id)
        started = time.monotonic()
        self.pool.begin(replica, adapter_id)
        handed_over = False  # the stream relay ends the in-flight count and closes
        response: EngineResponse | None = None
        try:
            try:
                response = await replica.client.send(call.path, call.body, call.stream)
                if call.stream and response.status_code == 200:
                    chunks = aiter(response.aiter_raw())
                    first = await _first_chunk(response, chunks)
                    if _ENGINE_DEAD_MESSAGE in first:
                        # The engine died before this stream's first token: vLLM sends its
                        # error as the first event. Nothing reached the client yet.
                        await response.aclose()
                        raise BackendFailure("engine_dead", "the engine died (stream)")
                    self.pool.record_success(replica)
                    self._loaded(replica, call, loading, ok=True, started=started)
                    handed_over = True
                    relay = self._relay(replica, adapter_id, response, chunks, first)
                    return StreamingResponse(
                        rename_model_stream(relay, call.backend_name, call.client_name),
                        media_type="text/event-stream",
                    )
                content = await _read(response)
            except BackendFailure as failure:
                self.pool.record_failure(replica)
                self._loaded(replica, call, loading, ok=False, started=started)
                failure.retry_after_s = self.retry_after_s
                retryable = failure.reason != "timeout"
                return _Failed(failure.reason, retryable, failure.as_api_error())
            return await self._answer(
                replica, call, loading, started, response.status_code, content
            )
        finally:
            if not handed_over:
                self.pool.end(replica, adapter_id)
                if response is not None and not response.is_closed:
                    # Cancelled (the client left) before the stream was handed over: close
                    # the connection so vLLM aborts the request.
                    with anyio.CancelScope(shield=True):
                        await response.aclose()

    async def _answer(
        self,
        replica: Replica,
        call: Call,
        loading: bool,
        started: float,
        status: int,
        content: bytes,
    ) -> Response | _Failed:
        """A whole (non-streamed, or error) answer: the client's response, an APIError, or
        a failure that may be retried elsewhere."""
        self._loaded(replica, call, loading, ok=200 <= status < 300, started=started)
        if status in _DYING_ENGINE_STATUSES:
            self.pool.record_failure(replica)
            error = _backend_error(status, content)
            return _Failed(f"status_{status}", status in _RETRIED_STATUSES, error)
        if status == 500 and _ENGINE_DEAD_MESSAGE in content:
            self.pool.record_failure(replica)
            error = APIError(
                503,
                "Backend unavailable: its engine died; retry shortly.",
                code="backend_unavailable",
                headers={"Retry-After": str(self.retry_after_s)},
            )
            return _Failed("engine_dead", True, error)
        self.pool.record_success(replica)
        if status == 404 and call.adapter is not None:
            message, _ = error_detail(content)
            raise await asyncio.to_thread(
                self.resolver.diagnose, call.adapter, replica.url, message
            )
        if status >= 400:
            raise _backend_error(status, content)
        content = rename_model(content, call.backend_name, call.client_name)
        return Response(content, status, media_type="application/json")

    def _loaded(
        self, replica: Replica, call: Call, loading: bool, *, ok: bool, started: float
    ) -> None:
        """Count the load this request caused on the replica, if it caused one."""
        if not loading or call.adapter is None:
            return
        label = self._adapter_label(str(call.adapter.name))
        ADAPTER_LOADS.labels(adapter=label, result="success" if ok else "error").inc()
        if ok:
            ADAPTER_LOAD_DURATION.observe(time.monotonic() - started)
        else:
            replica.held.discard(call.adapter.id)

    async def _relay(
        self,
        replica: Replica,
        adapter_id: str | None,
        response: EngineResponse,
        chunks: AsyncIterator[bytes],
        first: bytes,
    ) -> AsyncIterator[bytes]:
        """The stream to the client, whole events at a time (a cut never leaves half an
        event behind); a break ends it with an error event and [DONE] instead of a cut."""
        pending = first
        done = False
        try:
            try:
                while True:
                    cut = pending.rfind(_EVENT_END) + len(_EVENT_END)
                    if cut >= len(_EVENT_END):
                        events, pending = pending[:cut], pending[cut:]
                        done = done or _DONE in events
                        yield events
                    chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    pending += chunk
                if pending:
                    done = done or _DONE in pending
                    yield pending
                if done:
                    return
                detail = "the backend closed the stream before [DONE]"
            except BackendFailure as failure:
                detail = failure.detail
                self.pool.record_failure(replica)
            STREAM_INTERRUPTIONS.inc()
            log.error(
                "stream interrupted after its first byte",
                extra={"backend": replica.url, "error": detail},
            )
            yield _interruption_events(detail)
        finally:
            self.pool.end(replica, adapter_id)
            with anyio.CancelScope(shield=True):
                await response.aclose()


async def _first_chunk(response: EngineResponse, chunks: AsyncIterator[bytes]) -> bytes:
    """Wait for a stream's first bytes; raises BackendFailure (response closed) if none come."""
    try:
        async for chunk in chunks:
            if chunk:
                return chunk
        return b""
    except BackendFailure:
        await response.aclose()
        raise


async def _read(response: EngineResponse) -> bytes:
    """The whole body; raises BackendFailure if it breaks."""
    try:
        return await response.aread()
    finally:
        with anyio.CancelScope(shield=True):
            await response.aclose()


def _interruption_events(detail: str) -> bytes:
    body = error_body(
        502,
        f"The backend stopped in the middle of the stream: {detail}",
        code="stream_interrupted",
    )
    return b"data: " + json.dumps(body).encode() + _EVENT_END + _DONE + _EVENT_END


def _backend_error(status: int, content: bytes) -> APIError:
    """A backend error in the router's error shape and types.

    vLLM uses its own `type` names ("BadRequestError"); clients get OpenAI's.
    """
    message, param = error_detail(content)
    return APIError(status, message, param=param)
