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
from loraplex.router.tenancy.quotas import Admission, QuotaExceeded, QuotaLedger, quota_adapter_name
from loraplex.router.tenancy.request_metrics import RequestMetrics, ResponseObserver, ask_for_usage

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
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.ledger = ledger
        self.metrics = metrics
        self.base_model_name = base_model_name

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(("/v1/", "/admin/")):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        completion = scope["method"] == "POST" and path in COMPLETION_PATHS
        observer = ResponseObserver(stream=False, drop_usage_chunk=False)
        try:
            principal = await run_sync(self.authenticator.authenticate, _header(scope))
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
        except APIError as exc:
            observer = ResponseObserver(stream=False, drop_usage_chunk=False)
            await error_response(exc)(scope, receive, observer.wrap(send))
            self.metrics.record(None, principal.label, observer, reached_app=False)
            return
        model = parsed.model
        scope["state"]["parsed_request"] = parsed
        adapter = quota_adapter_name(model)
        tenant = principal.label
        scope["state"]["model"] = model
        stream = parsed.stream is True
        client_wants_usage = False
        if stream:
            data, client_wants_usage = ask_for_usage(data)
            if not client_wants_usage:
                body = json.dumps(data).encode()
        observer = ResponseObserver(stream, drop_usage_chunk=stream and not client_wants_usage)
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
        try:
            await self.app(scope, _replay(body, receive), observer.wrap(send))
        finally:
            in_flight.dec()
            # A client that disconnects cancels this task: still release quota and record.
            with anyio.CancelScope(shield=True):
                self.metrics.record(adapter, tenant, observer, reached_app=True)
                if admission is not None:
                    await self._settle(admission, observer.total_tokens)

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
