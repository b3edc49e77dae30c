"""HTTP wiring of the router: OpenAI endpoints, health, and error mapping in one place.

Requests go to a pool of vLLM replicas (router/backend_pool.py) through the forwarder
(router/forwarding.py: the picker, failover, stream relay)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from loraplex.adapters.local_store import LocalAdapter, LocalAdapterStore
from loraplex.router.adapter_loading import AdapterResolver
from loraplex.router.admin_adapters_api import admin_adapters_router
from loraplex.router.backend_pool import BackendPool, EngineWatch, split_urls
from loraplex.router.body_limit import BodyLimitMiddleware
from loraplex.router.errors import error_body, install_error_handlers
from loraplex.router.forwarding import Call, Forwarder
from loraplex.router.metrics_api import metrics_router
from loraplex.router.model_rewrite import request_with_model
from loraplex.router.openapi import admin_or_open, install_openapi
from loraplex.router.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from loraplex.router.request_log import RequestLogMiddleware
from loraplex.router.rollout import RolloutGuardian, user_key
from loraplex.router.tenancy.service import Tenancy
from loraplex.router.version_metrics import VersionLabels, VersionMiddleware
from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)


def create_app(
    settings: ServeSettings,
    backend_urls: str | Sequence[str] | None = None,
    engine_watch: EngineWatch | None = None,
) -> FastAPI:
    """The router app. `backend_urls` (a list, or one comma-separated string) default to
    the settings' `backend_url` list or `backend_discovery`; `engine_watch` is whatever
    restarts local engines (it makes `/health` fail only when none can come back)."""
    if isinstance(backend_urls, str):
        backend_urls = split_urls(backend_urls)
    pool = BackendPool.from_settings(settings, backend_urls)
    store = LocalAdapterStore(settings.adapters_dir)
    resolver = AdapterResolver.from_settings(settings, store)
    forwarder = Forwarder.from_settings(settings, pool, resolver)
    started_at = int(time.time())
    tenancy = Tenancy.from_settings(settings)
    # Adapter names hit the catalog on every request. A local SQLite query (~0.1 ms)
    # costs less than a hop to the threadpool (measured +0.4 ms p50 per request); a
    # database over the network runs off the event loop so it never stalls the others.
    catalog_is_local = settings.resolved_database_url().startswith("sqlite")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        yield
        await pool.close()
        resolver.close()
        tenancy.close()

    # FastAPI's /openapi.json, /docs and /redoc are open to anyone: ours take the admin key
    # once keys are required (router/openapi.py).
    app = FastAPI(
        title="loraplex",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    # Added before the guard, so inside it: the served version's header, metrics, rollbacks.
    version_labels = VersionLabels(settings.metrics_max_label_values)
    guardian = RolloutGuardian(resolver.registry.catalog, version_labels)
    app.add_middleware(VersionMiddleware, labels=version_labels, guardian=guardian)
    # auth, access, quotas, per-request metrics, /admin (a tenant's deletion takes its adapters)
    tenancy.install(app, resolver.registry)
    if resolver.registry is not None:
        app.include_router(admin_adapters_router(resolver.registry))
    # Outside the guard (which reads bodies), inside the request log (413s are logged).
    app.add_middleware(BodyLimitMiddleware, limit_bytes=settings.max_request_body_mib << 20)
    app.add_middleware(RequestLogMiddleware)
    app.include_router(metrics_router(pool, tenancy.require_operator))

    install_error_handlers(app)  # domain errors → OpenAI error JSON, in one place
    install_openapi(app, admin_or_open(tenancy.authenticator))

    async def forward(request: Request, path: str, schema: type) -> Response:
        body = await request.body()
        # The API guard parsed (and type-checked) the body once; parse only without it.
        parsed = getattr(request.state, "parsed_request", None) or parse_request(body, schema)
        request.state.model = parsed.model
        if parsed.model == settings.base_model_name:
            adapter = None
        else:
            # Whose request it is: a weighted alias gives the same user the same version.
            who = user_key(getattr(parsed, "user", None), request.headers)
            if catalog_is_local:
                adapter = resolver.resolve(parsed.model, who)
            else:
                adapter = await run_in_threadpool(resolver.resolve, parsed.model, who)
        request.state.served_adapter = adapter  # router/version_metrics.py reads it
        # The name exists and the caller may use it (the guard checked access): only now
        # may it take a metric label of its own (router/tenancy/request_metrics.py).
        request.state.model_resolved = True
        backend_name = adapter.id if adapter is not None else parsed.model
        if adapter is not None:
            body = request_with_model(body, backend_name, parsed.model)
        # The replica's resolvers load the adapter on first request; the forwarder picks
        # the replica and fails over (never re-entering the quota guard around us).
        call = Call(path, body, bool(parsed.stream), adapter, backend_name, parsed.model)
        return await forwarder.forward(call)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await forward(request, "/v1/chat/completions", ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request, "/v1/completions", CompletionRequest)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        base = _model_card(settings.base_model_name, started_at, parent=None)
        registry_models = resolver.registry_models()
        # A registry adapter shadows a local folder of the same name: list the name once.
        shadowing = {name for name, _ in registry_models}
        cards = [base] + [
            _adapter_card(a, settings.base_model_name)
            for a in store.list()
            if a.id not in shadowing
        ]
        cards += [
            _model_card(name, created, parent=settings.base_model_name)
            for name, created in registry_models
        ]
        return {"object": "list", "data": tenancy.visible(request, cards)}

    @app.get("/health")
    async def health() -> JSONResponse:
        """The router process is alive (Kubernetes liveness). With local engines it fails
        when none can serve and none is being restarted, so the pod gets restarted."""
        if engine_watch is not None and not pool.up() and not engine_watch.restarting():
            return JSONResponse(
                error_body(
                    503,
                    "No engine is up and none is being restarted",
                    code="backend_unavailable",
                ),
                503,
            )
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """At least one replica takes traffic and the database answers (Kubernetes
        readiness). Replica health comes from the pool's checks (every few seconds)."""
        if not await tenancy.database_reachable():
            return JSONResponse(
                error_body(503, "Database is not reachable", code="database_unavailable"), 503
            )
        up, total = len(pool.up()), len(pool.replicas)
        if up:
            return JSONResponse(
                {"status": "ready", "replicas": {"up": up, "total": total}, "database": "up"}
            )
        error = forwarder.no_replica_error()
        return JSONResponse(
            error_body(503, f"No backend replica is up (0 of {total})", code=error.code),
            503,
            headers=error.headers,
        )

    return app


def _model_card(model_id: str, created: int, parent: str | None) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "loraplex",
        "root": model_id,
        "parent": parent,
    }


def _adapter_card(adapter: LocalAdapter, base_name: str) -> dict:
    return _model_card(adapter.id, adapter.created, parent=base_name)
