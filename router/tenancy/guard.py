"""ASGI middleware in front of the API: authentication, model access, quotas and metrics.

It runs before routing, so the endpoints (and the adapter resolution inside them) stay
unaware of tenants: `/v1/*` and `/admin/*` get `request.state.principal`; the two
completion endpoints are also checked for access and quota, and measured. Pure ASGI so
streamed responses pass through chunk by chunk.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
from anyio.to_thread import run_sync
from sqlalchemy.exc import SQLAlchemyError

from loraplex.router.errors import APIError, database_unavailable, error_response, model_not_found
from loraplex.router.metrics import IN_FLIGHT, QUOTA_REJECTIONS
from loraplex.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    load_json_object,
    validate,
)
from loraplex.router.tenancy.auth import Authenticator, Principal, may_use
from loraplex.router.tenancy.cache_salt import CacheSalts
from loraplex.router.tenancy.quotas import Admission, QuotaExceeded, QuotaLedger, quota_adapter_name
from loraplex.router.tenancy.request_metrics import (
    CLIENT_CLOSED_REQUEST,
    RequestMetrics,
    ResponseObserver,
    UsageAsked,
    ask_for_usage,
)

log = logging.getLogger(__name__)

REQUEST_SCHEMAS = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
COMPLETION_PATHS = frozenset(REQUEST_SCHEMAS)


def _database_error() -> APIError:
    return database_unavailable()  # the one answer to a database failure (router/errors.py)


class APIGuard:
    def __init__(
        self,
        app: Any,
        *,
        authenticator: Authenticator,
        ledger: QuotaLedger,
        metrics: RequestMetrics,
        base_model_name: str,
        cache_salts: CacheSalts | None = None,
        default_max_tokens: int = 2048,
    ) -> None:
        """`cache_salts`: default a random secret (see router/tenancy/cache_salt.py);
        `default_max_tokens`: the engine's context length, the most a request without
        `max_tokens` may generate."""
        self.app = app
        self.authenticator = authenticator
        self.ledger = ledger
        self.metrics = metrics
        self.base_model_name = base_model_name
        self.cache_salts = cache_salts or CacheSalts()
        self.default_max_tokens = default_max_tokens

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(("/v1/", "/admin/")):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        completion = scope["method"] == "POST" and path in COMPLETION_PATHS
        observer = ResponseObserver(stream=False)
        try:
            principal = self.authenticator.open_mode_principal() or await run_sync(
                self.authenticator.authenticate, _header(scope)
            )
        except (APIError, SQLAlchemyError) as exc:
            error = exc if isinstance(exc, APIError) else _database_error()
            if isinstance(exc, SQLAlchemyError):
                log.error("tenancy database error during authentication: %r", exc)
            await error_response(error)(scope, receive, observer.wrap(send))
            if completion:
                self.metrics.record(None, "none", observer, reached_app=False)
            return
        state["principal"] = principal
        state["tenant"] = principal.label
        if principal.key_prefix:
            state["key_prefix"] = principal.key_prefix
        if completion:
            await self._completion(principal, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _completion(self, principal: Principal, scope: dict, receive: Any, send: Any) -> None:
        # The one reading of the body: the route and the quota use this typed request, so
        # no layer reads `stream` (or anything else) differently.
        try:
            body = await _read_body(receive)
            schema = REQUEST_SCHEMAS[scope["path"]]
            data = load_json_object(body)
            parsed = validate(data, schema)
            salt = self.cache_salts.salt(principal, data.get("cache_salt"))
        except APIError as exc:
            observer = ResponseObserver(stream=False)
            await error_response(exc)(scope, receive, observer.wrap(send))
            self.metrics.record(None, principal.label, observer, reached_app=False)
            return
        model = parsed.model
        scope["state"]["parsed_request"] = parsed
        adapter = quota_adapter_name(model)
        tenant = principal.label
        scope["state"]["model"] = model
        stream = parsed.stream is True
        changes: dict[str, Any] = {} if salt is None else {"cache_salt": salt}
        usage_asked: UsageAsked = "every_chunk"
        if stream:
            # Usage on every chunk, so a stream cut short is still charged what it sent.
            options, usage_asked = ask_for_usage(data.get("stream_options"))
            if usage_asked != "every_chunk":
                changes["stream_options"] = options
        body = _with_fields(body, data, changes)
        observer = ResponseObserver(stream, usage_asked, parsed.n or 1)
        if not may_use(principal, model, self.base_model_name):
            await error_response(model_not_found(model))(scope, receive, observer.wrap(send))
            self.metrics.record(None, tenant, observer, reached_app=False)
            return
        admission: Admission | None = None
        if principal.tenant_id is not None:
            try:
                admission = await run_sync(
                    self.ledger.admit, principal.tenant_id, model, parsed.worst_case_tokens()
                )
            except (QuotaExceeded, SQLAlchemyError) as exc:
                error = self._rejection(exc, tenant)
                await error_response(error)(scope, receive, observer.wrap(send))
                self.metrics.record(adapter, tenant, observer, reached_app=False)
                return
        in_flight = IN_FLIGHT.labels(
            self.metrics.provisional_adapter_label(adapter), self.metrics.tenant_label(tenant)
        )
        in_flight.inc()
        client_left = False
        try:
            client_left = await self._until_client_leaves(
                scope, receive, _replay(body, receive), observer.wrap(send), observer
            )
        finally:
            in_flight.dec()
            # A client that disconnects cancels this task: still release quota and record.
            with anyio.CancelScope(shield=True):
                # A label of its own only for a name the route resolved (exists, allowed):
                # not for a made-up one, even if the client left before its 404.
                resolved = bool(scope["state"].get("model_resolved"))
                self.metrics.record(adapter, tenant, observer, reached_app=resolved)
                if admission is not None:
                    tokens = observer.total_tokens
                    if client_left and not observer.usage_seen and not observer.output_chunks:
                        tokens = self._unseen_cost(parsed)
                    await self._settle(admission, tokens)

    async def _until_client_leaves(
        self, scope: dict, receive: Any, app_receive: Any, send: Any, observer: ResponseObserver
    ) -> bool:
        """Run the endpoint, and stop it if the client disconnects before the response
        ended; True when it did. Stopping it closes the backend request, and vLLM aborts a
        request whose connection closes, so a client that left costs no more engine time.

        Starlette stops a streamed response on disconnect by itself, but not a route still
        waiting for the backend: a non-streamed answer, or a stream's first chunk."""
        left = False
        failure: Exception | None = None
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal left
                # The body was read already: what comes now is the disconnect (uvicorn also
                # reports one once the response is complete).
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not observer.complete:
                    left = True
                    group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self.app(scope, app_receive, send)
            except Exception as exc:
                failure = exc  # raised as itself below, not inside an ExceptionGroup
            group.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if left and observer.status == 500 and not observer.complete:
            observer.status = CLIENT_CLOSED_REQUEST  # nothing was answered
        return left

    def _unseen_cost(self, parsed: Any) -> int:
        """What a request whose client left before any usage came back is charged: the
        router cannot know how far the engine got before it aborted the request, so the
        most it could have generated (n × max_tokens, or n × the context length)."""
        worst_case = parsed.worst_case_tokens()
        if worst_case is not None:
            return int(worst_case)
        return (parsed.n or 1) * self.default_max_tokens

    def _rejection(self, exc: Exception, tenant: str) -> APIError:
        if isinstance(exc, QuotaExceeded):
            QUOTA_REJECTIONS.labels(self.metrics.tenant_label(tenant), exc.limit).inc()
            return APIError(
                429,
                str(exc),
                code="rate_limit_exceeded",
                headers={"Retry-After": str(exc.retry_after_s)},
            )
        log.error("tenancy database error during quota admission: %r", exc)
        return _database_error()

    async def _settle(self, admission: Admission, tokens: int) -> None:
        try:
            await run_sync(self.ledger.settle, admission, tokens)
        except SQLAlchemyError as exc:
            # Leases lapse on their own; the tokens of this request go uncharged.
            log.error("could not settle quota: %r", exc)


def _header(scope: dict) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            return value.decode("latin-1")
    return None


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _with_fields(body: bytes, data: dict[str, Any], fields: dict[str, Any]) -> bytes:
    """The body with `fields` set. When the client sent none of them they go in right after
    the opening brace and the client's bytes follow as sent (no re-encoding of a long
    prompt on every request); otherwise the parsed body is encoded again."""
    if not fields:
        return body
    # body[1] is NUL for UTF-16/32 JSON, which json.loads accepts too.
    if body[:1] == b"{" and body[1:2] != b"\x00" and data and not fields.keys() & data.keys():
        added = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)[1:-1]
        return b"{" + added.encode() + b"," + body[1:]
    return json.dumps({**data, **fields}, ensure_ascii=False).encode()


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that yields the (possibly rewritten) body once, then the real stream."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
