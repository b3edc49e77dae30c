"""`/metrics` (the router's Prometheus metrics) and `/metrics/backend` (vLLM's own).

The backend listens on loopback only, so Prometheus reaches vLLM's metrics through the
router. Both are unauthenticated, like most scrape targets: they carry adapter and
tenant names but no keys or prompts; keep the router port off the public internet or
filter `/metrics*` at the ingress if names are sensitive.
"""

from __future__ import annotations

import httpx
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplex.router.errors import APIError
from loraplex.router.metrics import BACKEND_UP

_TIMEOUT = httpx.Timeout(5.0, connect=2.0)


def metrics_router(backend_url: str) -> APIRouter:
    router = APIRouter()
    backend_url = backend_url.rstrip("/")

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # Measured at scrape time, so the value is never older than the scrape.
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                healthy = (await client.get(f"{backend_url}/health")).status_code == 200
        except httpx.HTTPError:
            healthy = False
        BACKEND_UP.labels(backend_url).set(1 if healthy else 0)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/metrics/backend", include_in_schema=False)
    async def backend_metrics() -> Response:
        try:
            async with httpx.AsyncClient(timeout=_TIMEOUT) as client:
                upstream = await client.get(f"{backend_url}/metrics")
        except httpx.HTTPError as exc:
            raise APIError(
                503, f"Backend unavailable: {exc!r}", code="backend_unavailable"
            ) from None
        return Response(
            upstream.content,
            upstream.status_code,
            media_type=upstream.headers.get("content-type", CONTENT_TYPE_LATEST),
        )

    return router
