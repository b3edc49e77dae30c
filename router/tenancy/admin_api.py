"""Admin HTTP endpoints: tenants, API keys and quotas (admin keys only).

The same operations as `loraplex tenants|keys|quotas`; a tenant key gets 403, no key 401.
Deleting a tenant also deletes its registry adapters (router/tenancy/tenant_adapters.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from loraplex.adapters.registry import Registry
from loraplex.router.errors import APIError
from loraplex.router.protocol import load_json_object, validate
from loraplex.router.tenancy.auth import Principal
from loraplex.router.tenancy.store import (
    AlreadyExists,
    KeyInfo,
    NotFound,
    Quota,
    TenancyError,
    TenancyStore,
    Tenant,
    parse_expiry,
)
from loraplex.router.tenancy.tenant_adapters import delete_tenant as delete_tenant_everywhere

# The quota columns are 32-bit integers on PostgreSQL; larger numbers are a 400 naming the
# field, not an OverflowError from the driver.
_MAX_LIMIT = 2**31 - 1


class AdminBody(BaseModel):
    """Admin request bodies: unknown fields are an error naming the field, and types are
    strict (`true` or `"10"` for a number is a 400, not 1 or 10)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TenantCreate(AdminBody):
    name: str = Field(min_length=1, max_length=64)


class KeyCreate(AdminBody):
    tenant: str | None = Field(None, max_length=64)
    """The tenant the key belongs to; omit (with admin=true) for an admin key."""
    admin: bool = False
    expires: str | None = Field(None, max_length=64)
    """Duration from now (`30d`, `12h`) or an ISO 8601 time."""
    description: str = Field("", max_length=200)


class QuotaSet(AdminBody):
    """A field left out keeps its limit; a null removes it."""

    tenant: str = Field(min_length=1, max_length=64)
    adapter: str = Field("", max_length=200)
    requests_per_minute: int | None = Field(None, le=_MAX_LIMIT)
    tokens_per_minute: int | None = Field(None, le=_MAX_LIMIT)
    max_concurrent: int | None = Field(None, le=_MAX_LIMIT)


def require_admin(request: Request) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or principal.role == "anonymous":
        raise APIError(401, "Admin endpoints need an admin API key.", code="invalid_api_key")
    if principal.role != "admin":
        raise APIError(403, "This API key may not use admin endpoints.", code="admin_required")
    return principal


async def parse_admin_body(request: Request, schema: type[AdminBody]) -> Any:
    """The body validated by `schema`, or a 400 naming the field (also for bodies that are
    not JSON, not an object, or nested too deeply)."""
    return validate(load_json_object(await request.body()), schema)


async def _call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking store call; store errors become API errors naming the field."""
    try:
        return await run_in_threadpool(function, *args, **kwargs)
    except NotFound as exc:
        raise APIError(404, str(exc), param=exc.field, code="not_found") from None
    except AlreadyExists as exc:
        raise APIError(409, str(exc), param=exc.field, code="already_exists") from None
    except TenancyError as exc:
        raise APIError(400, str(exc), param=exc.field) from None


def tenant_json(tenant: Tenant) -> dict:
    return {"name": tenant.name, "created_at": tenant.created_at, "active_keys": tenant.active_keys}


def key_json(key: KeyInfo, now: float) -> dict:
    return {
        "prefix": key.prefix,
        "tenant": key.tenant,
        "admin": key.tenant is None,
        "description": key.description,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "status": key.status(now),
    }


def quota_json(quota: Quota) -> dict:
    return {
        "tenant": quota.tenant,
        "adapter": quota.adapter,
        "requests_per_minute": quota.requests_per_minute,
        "tokens_per_minute": quota.tokens_per_minute,
        "max_concurrent": quota.max_concurrent,
    }


def admin_router(store: TenancyStore, registry: Registry | None = None) -> APIRouter:
    """`registry`: the catalog whose adapters a tenant's deletion removes with it."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    @router.get("/tenants")
    async def list_tenants() -> dict:
        return {"data": [tenant_json(t) for t in await _call(store.list_tenants)]}

    @router.post("/tenants", status_code=201)
    async def create_tenant(request: Request) -> dict:
        body: TenantCreate = await parse_admin_body(request, TenantCreate)
        return tenant_json(await _call(store.create_tenant, body.name))

    @router.delete("/tenants/{name}")
    async def delete_tenant(name: str) -> dict:
        catalog, blobs = (registry.catalog, registry.store) if registry else (None, None)
        deleted = await _call(delete_tenant_everywhere, store, name, catalog, blobs)
        return {"deleted": name, "adapters_deleted": list(deleted.adapters)}

    @router.get("/keys")
    async def list_keys(tenant: str | None = None) -> dict:
        keys = await _call(store.list_keys, tenant)
        now = store.clock()
        return {"data": [key_json(k, now) for k in keys]}

    @router.post("/keys", status_code=201)
    async def create_key(request: Request) -> JSONResponse:
        body: KeyCreate = await parse_admin_body(request, KeyCreate)
        if (body.tenant is None) != body.admin:
            raise APIError(400, "Give either 'tenant' or 'admin': true.", param="tenant")
        try:
            expires_at = parse_expiry(body.expires, store.clock()) if body.expires else None
        except TenancyError as exc:
            raise APIError(400, str(exc), param=exc.field) from None
        raw, info = await _call(store.create_key, body.tenant, expires_at, body.description)
        # The only time the key is ever shown; never cache this response.
        return JSONResponse(
            {"key": raw, **key_json(info, store.clock())},
            201,
            headers={"Cache-Control": "no-store"},
        )

    @router.delete("/keys/{prefix}")
    async def revoke_key(prefix: str) -> dict:
        info = await _call(store.revoke_key, prefix)
        return key_json(info, store.clock())

    @router.get("/quotas")
    async def list_quotas(tenant: str | None = None) -> dict:
        return {"data": [quota_json(q) for q in await _call(store.list_quotas, tenant)]}

    @router.put("/quotas")
    async def set_quota(request: Request) -> dict:
        body: QuotaSet = await parse_admin_body(request, QuotaSet)
        # Only the limits the body names change (exclude_unset tells absent from null).
        changes = body.model_dump(exclude_unset=True, exclude={"tenant", "adapter"})
        quota = await _call(store.set_quota, body.tenant, body.adapter, **changes)
        return quota_json(quota)

    @router.delete("/quotas")
    async def delete_quota(tenant: str | None = None, adapter: str = "") -> dict:
        if not tenant:
            raise APIError(400, "Query parameter 'tenant' is required.", param="tenant")
        await _call(store.delete_quota, tenant, adapter)
        return {"deleted": {"tenant": tenant, "adapter": adapter}}

    return router
