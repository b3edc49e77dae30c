"""`/metrics` (the router's Prometheus metrics) and `/metrics/backend` (vLLM's own).

The backends listen on loopback (or inside the cluster), so Prometheus reaches vLLM's
metrics through the router: `/metrics/backend` scrapes every replica that takes traffic
and serves their metrics as one exposition, each sample labelled with its `backend`
(ejected replicas are left out; a scrape fails with 503 only when no replica answers).
Both carry every tenant's name and traffic, and vLLM's prefix-cache counters (a timing
oracle on other tenants' prompts), so they take the same credential as `/admin/*`: once
keys are required (an admin key or any tenant exists) only an admin key reads them (no
key 401, a tenant key 403); open loopback mode (no keys at all) keeps them open.
Prometheus sends the admin key from a file (`authorization.credentials_file`,
deploy/prometheus/prometheus.yml).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplex.router.backend_pool import BackendPool, Replica
from loraplex.router.errors import APIError

_TIMEOUT = httpx.Timeout(5.0, connect=2.0)


def metrics_router(pool: BackendPool, authorize: Callable[[Request], Awaitable[None]]) -> APIRouter:
    """`authorize` raises the 401/403 APIError for a caller that may not read metrics."""
    router = APIRouter(dependencies=[Depends(authorize)])

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # Backend gauges are kept current by the pool's health checks (every few seconds).
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/metrics/backend", include_in_schema=False)
    async def backend_metrics() -> Response:
        replicas = pool.up()
        scraped = await asyncio.gather(*(_scrape(r) for r in replicas))
        answers = [(r.label, text) for r, text in zip(replicas, scraped, strict=True) if text]
        if not answers:
            raise APIError(503, "No backend answered its /metrics", code="backend_unavailable")
        return Response(merge_expositions(answers), media_type=CONTENT_TYPE_LATEST)

    return router


async def _scrape(replica: Replica) -> str | None:
    try:
        response = await replica.client.get("/metrics", _TIMEOUT)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def merge_expositions(scrapes: list[tuple[str, str]]) -> str:
    """Prometheus text expositions of several backends as one, every sample labelled with
    `backend`. Samples are regrouped under their family's HELP/TYPE (the format wants
    each family once, in one block)."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for backend, text in scrapes:
        family = ""
        for line in text.splitlines():
            if not line.strip() or line.startswith("# EOF"):
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    family_headers = headers.setdefault(family, [])
                    if len(family_headers) < 2 and line not in family_headers:
                        family_headers.append(line)
                    samples.setdefault(family, [])
                continue
            samples.setdefault(family, []).append(_with_backend(line, backend))
    lines: list[str] = []
    for family, family_samples in samples.items():
        lines += headers.get(family, [])
        lines += family_samples
    return "\n".join(lines) + "\n"


def _with_backend(sample: str, backend: str) -> str:
    label = f'backend="{backend}"'
    name_end = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=-1)
    if name_end < 0:
        return sample
    if sample[name_end] == "{":
        rest = sample[name_end + 1 :]
        return f"{sample[:name_end]}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:name_end]}{{{label}}}{sample[name_end:]}"
