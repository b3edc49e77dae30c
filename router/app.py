"""HTTP wiring of the router: OpenAI endpoints, health, and error mapping in one place."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.adapters.local_store import LocalAdapter, LocalAdapterStore
from loraplex.router.adapter_loading import AdapterLoader
from loraplex.router.admin_adapters_api import admin_adapters_router
from loraplex.router.backend_client import BackendClient, error_detail
from loraplex.router.errors import APIError, error_body, error_response
from loraplex.router.metrics import BACKEND_UP
from loraplex.router.metrics_api import metrics_router
from loraplex.router.model_rewrite import rename_model, rename_model_stream, request_with_model
from loraplex.router.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from loraplex.router.request_log import RequestLogMiddleware
from loraplex.router.tenancy.service import Tenancy
from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)


def create_app(settings: ServeSettings, backend_url: str) -> FastAPI:
    backend = BackendClient(backend_url, timeout_s=settings.backend_timeout_s)
    store = LocalAdapterStore(settings.adapters_dir)
    loader = AdapterLoader.from_settings(settings, store, backend)
    started_at = int(time.time())
    tenancy = Tenancy.from_settings(settings)
    # Adapter names hit the catalog on every request. A local SQLite query (~0.1 ms)
    # costs less than a hop to the threadpool (measured +0.4 ms p50 per request); a
    # database over the network runs off the event loop so it never stalls the others.
    catalog_is_local = settings.resolved_database_url().startswith("sqlite")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.close()
        tenancy.close()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    tenancy.install(app)  # auth, access, quotas, per-request metrics, /admin
    if loader.registry is not None:
        app.include_router(admin_adapters_router(loader.registry))
    app.add_middleware(RequestLogMiddleware)
    app.include_router(metrics_router(backend_url))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, f"Internal error: {type(exc).__name__}"), 500)

    async def forward(request: Request, path: str, schema: type) -> Response:
        body = await request.body()
        parsed = parse_request(body, schema)
        request.state.model = parsed.model
        if parsed.model == settings.base_model_name:
            adapter = None
        elif catalog_is_local:
            adapter = loader.resolve(parsed.model)
        else:
            adapter = await run_in_threadpool(loader.resolve, parsed.model)
        backend_name = adapter.id if adapter is not None else parsed.model
        if adapter is not None:
            body = request_with_model(body, backend_name, parsed.model)
        stream = bool(parsed.stream)
        # Registers the adapter first (once, under its lock) and keeps it registered until
        # the backend has accepted the request.
        response = await loader.send(adapter, path, body, stream)
        if stream and response.status_code == 200:
            return StreamingResponse(
                rename_model_stream(response.aiter_raw(), backend_name, parsed.model),
                media_type="text/event-stream",
                background=BackgroundTask(response.aclose),
            )
        content = await response.aread() if stream else response.content
        await response.aclose()
        if response.status_code >= 400:
            return _backend_error(response.status_code, content)
        content = rename_model(content, backend_name, parsed.model)
        return Response(content, response.status_code, media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await forward(request, "/v1/chat/completions", ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request, "/v1/completions", CompletionRequest)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        base = _model_card(settings.base_model_name, started_at, parent=None)
        cards = [base] + [_adapter_card(a, settings.base_model_name) for a in store.list()]
        cards += [
            _model_card(name, created, parent=settings.base_model_name)
            for name, created in loader.registry_models()
        ]
        return {"object": "list", "data": tenancy.visible(request, cards)}

    @app.get("/health")
    async def health() -> dict:
        """The router process is alive (Kubernetes liveness)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """The backend answers, the base model is loaded and the database answers
        (Kubernetes readiness)."""
        if not await tenancy.database_reachable():
            return JSONResponse(
                error_body(503, "Database is not reachable", code="database_unavailable"), 503
            )
        if await backend.is_healthy():
            BACKEND_UP.labels(backend_url).set(1)
            return JSONResponse({"status": "ready", "backend": "up", "database": "up"})
        BACKEND_UP.labels(backend_url).set(0)
        return JSONResponse(
            error_body(503, "Backend is not ready", code="backend_unavailable"), 503
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


def _backend_error(status: int, content: bytes) -> Response:
    """Re-issue a backend error in the router's error shape and types.

    vLLM uses its own `type` names ("BadRequestError"); clients get OpenAI's.
    """
    message, param = error_detail(content)
    return JSONResponse(error_body(status, message, param), status)
