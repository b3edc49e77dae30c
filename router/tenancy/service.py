"""Tenancy wired into the router: the database, the key check at start-up, the API guard
middleware and the admin endpoints. `create_app` calls `Tenancy.from_settings` and
`install`; everything tenant-specific stays behind this one object."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from loraplex.adapters.registry import Registry
from loraplex.database import shared_engine
from loraplex.router.errors import APIError
from loraplex.router.tenancy.admin_api import admin_router
from loraplex.router.tenancy.auth import ANONYMOUS, Authenticator, check_startup_access, is_loopback
from loraplex.router.tenancy.auth import may_use as _may_use
from loraplex.router.tenancy.cache_salt import CacheSalts
from loraplex.router.tenancy.guard import APIGuard
from loraplex.router.tenancy.quotas import QuotaLedger
from loraplex.router.tenancy.request_metrics import RequestMetrics
from loraplex.router.tenancy.store import TenancyStore
from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)

# A lease outlives the longest request the backend may take, then lapses.
_LEASE_MARGIN_S = 60.0


class Tenancy:
    def __init__(self, store: TenancyStore, settings: ServeSettings) -> None:
        self.store = store
        self.base_model_name = settings.base_model_name
        self.authenticator = Authenticator(
            store,
            settings.admin_key.get_secret_value(),
            open_allowed=is_loopback(settings.host) or settings.allow_open_access,
        )
        self.ledger = QuotaLedger(store.engine, settings.backend_timeout_s + _LEASE_MARGIN_S)
        self.metrics = RequestMetrics(settings.metrics_max_label_values, settings.base_model_name)
        # Per-tenant prefix-cache salts keyed by the router-to-engine secret (cache_salt.py).
        self.cache_salts = CacheSalts(settings.backend_api_key.get_secret_value())
        self.max_model_len = settings.max_model_len

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> Tenancy:
        """Open the database (the process's shared engine, migrated once); refuse open
        access on a public address."""
        tenancy = cls(TenancyStore(shared_engine(settings.resolved_database_url())), settings)
        check_startup_access(
            settings.host, settings.allow_open_access, tenancy.authenticator.keys_required()
        )
        return tenancy

    def install(self, app: FastAPI, registry: Registry | None = None) -> None:
        """Add the guard middleware (call before the request-log middleware, which must stay
        outermost so rejections are logged with their request id) and the admin routes
        (`registry`: whose adapters a tenant's deletion removes)."""
        app.add_middleware(
            APIGuard,
            authenticator=self.authenticator,
            ledger=self.ledger,
            metrics=self.metrics,
            base_model_name=self.base_model_name,
            cache_salts=self.cache_salts,
            default_max_tokens=self.max_model_len,
        )
        app.include_router(admin_router(self.store, registry))

    async def require_operator(self, request: Request) -> None:
        """FastAPI dependency of operator-only reads (`/metrics`, `/metrics/backend`): an
        admin key once keys are required (no key 401, a tenant key 403, like `/admin/*`);
        anyone in open loopback mode, where there are no keys to ask for.

        These paths are outside the API guard (health checks and scrapes must not pass
        through quotas), so the key is checked here, with the same authenticator; a
        database outage is the 503 that router/errors.py maps every one to."""
        principal = await run_in_threadpool(
            self.authenticator.authenticate, request.headers.get("authorization")
        )
        if principal.role == "tenant":
            raise APIError(403, "This API key may not read metrics.", code="admin_required")

    def visible(self, request: Request, cards: list[dict]) -> list[dict]:
        """The model cards (`id` = model name) the caller may see and call."""
        principal = getattr(request.state, "principal", ANONYMOUS)
        return [c for c in cards if _may_use(principal, c["id"], self.base_model_name)]

    async def database_reachable(self) -> bool:
        try:
            await run_in_threadpool(self.store.ping)
        except SQLAlchemyError as exc:
            log.warning("tenancy database unreachable: %r", exc)
            return False
        return True

    def close(self) -> None:
        """Close the pooled connections (the shared engine stays usable: the next call
        opens new ones)."""
        self.store.engine.dispose()


def check_serve_access(settings: ServeSettings) -> None:
    """The start-up key check alone, for `loraplex serve` to run before starting vLLM.

    Raises RuntimeError when the router would serve without keys on a public address.
    """
    Tenancy.from_settings(settings).close()
