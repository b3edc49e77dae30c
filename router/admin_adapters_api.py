"""Admin HTTP endpoints for registry adapters: list, alias, rollback, delete (admin keys only).

The same operations as `loraplex adapters list|alias|rollback|delete`, so an operator
can manage adapters without shell access to the catalog. Publishing stays a CLI step:
it validates and uploads a folder of files. Changes take effect on the next request
(the router resolves names against the catalog per request).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field, StrictInt
from starlette.concurrency import run_in_threadpool

from loraplex.adapters.names import InvalidAdapterName
from loraplex.adapters.refs import parse_adapter_ref, parse_registry_name, parse_version
from loraplex.adapters.registry import Registry
from loraplex.adapters.splits import (
    TOTAL_WEIGHT,
    check_weights,
    format_weights,
    incumbent_of,
    parse_guard,
)
from loraplex.router.errors import APIError
from loraplex.router.tenancy.admin_api import AdminBody, parse_admin_body, require_admin


class AliasSet(AdminBody):
    version: str | None = Field(None, min_length=2)
    """The one version the alias points at: `v1`, `v2`, … (or give `weights`)."""
    weights: dict[str, StrictInt] | None = None
    """A weighted alias (canary): `{"v3": 90, "v4": 10}`, integers summing to 100."""
    guard: str | None = None
    """Automatic rollback of a weighted alias: `error_rate<=2x,min_requests=200`."""


async def _registry_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking registry call off the event loop. Its errors (bad name, unknown
    adapter, conflict, store or database down) become API errors in one place
    (router/errors.py `api_error_for`), the same as on every other endpoint."""
    return await run_in_threadpool(function, *args, **kwargs)


def _name(tenant: str, name: str) -> Any:
    try:
        return parse_registry_name(f"{tenant}/{name}")
    except InvalidAdapterName as exc:
        raise APIError(400, str(exc), param="name") from None


def _weights(body: AliasSet) -> dict[int, int]:
    """{version: weight} from `version` or `weights` (exactly one); 400 naming the field."""
    if (body.version is None) == (body.weights is None):
        raise APIError(400, "give either 'version' or 'weights'", param="weights")
    if body.version is not None:
        return {_version(body.version): TOTAL_WEIGHT}
    try:
        numbers = {parse_version(v): w for v, w in (body.weights or {}).items()}
        if body.guard is not None:
            parse_guard(body.guard)
        return check_weights(numbers)
    except InvalidAdapterName as exc:
        field = "guard" if "guard" in str(exc) else "weights"
        raise APIError(400, str(exc), param=field) from None


def _version(text: str) -> int:
    try:
        return parse_version(text)
    except InvalidAdapterName as exc:
        raise APIError(400, str(exc), param="version") from None


def admin_adapters_router(registry: Registry) -> APIRouter:
    router = APIRouter(prefix="/admin/adapters", dependencies=[Depends(require_admin)])
    catalog = registry.catalog

    @router.get("")
    async def list_adapters(tenant: str | None = None) -> dict:
        adapters = await _registry_call(catalog.list_adapters, tenant)
        return {"data": [adapter.to_json() for adapter in adapters]}

    @router.put("/{tenant}/{name}/aliases/{alias}")
    async def set_alias(tenant: str, name: str, alias: str, request: Request) -> dict:
        try:  # the same name and alias rules as a request's `model`
            ref = parse_adapter_ref(f"{tenant}/{name}@{alias}")
        except InvalidAdapterName as exc:
            raise APIError(400, str(exc), param="alias") from None
        adapter = _name(tenant, name)
        body: AliasSet = await parse_admin_body(request, AliasSet)
        weights = _weights(body)
        previous = await _registry_call(
            catalog.set_alias_weights, adapter, ref.alias, weights, body.guard
        )
        return {
            "adapter": str(adapter),
            "alias": alias,
            "version": f"v{incumbent_of(weights)}",
            "weights": {f"v{n}": w for n, w in weights.items()},
            "guard": str(parse_guard(body.guard)) if body.guard else None,
            "previous": format_weights(previous) if previous is not None else None,
        }

    @router.post("/{tenant}/{name}/rollback")
    async def rollback(tenant: str, name: str) -> dict:
        adapter = _name(tenant, name)
        old, new = await _registry_call(catalog.rollback, adapter)
        return {
            "adapter": str(adapter),
            "alias": "latest",
            "version": f"v{new}",
            "previous": f"v{old}",
        }

    @router.delete("/{tenant}/{name}/versions/{version}")
    async def delete_version(tenant: str, name: str, version: str, force: bool = False) -> dict:
        adapter = _name(tenant, name)
        result = await _registry_call(registry.delete_version, adapter, _version(version), force)
        return {
            "deleted": result.deleted.ref,
            "aliases_moved": {
                alias: (f"v{target}" if target is not None else None)
                for alias, target in result.aliases_moved.items()
            },
        }

    return router
