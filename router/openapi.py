"""The router's OpenAPI contract (`/openapi.json`) and its documentation pages (`/docs`,
`/redoc`), behind the same credential as `/metrics` and `/admin/*`.

The completion endpoints read their body themselves (the API guard parses it once, under
the size limit), so FastAPI cannot see their request models: the contract adds them from
router/protocol.py, the models that validate every request, so the document cannot drift
from what the router accepts. Every operation lists the error statuses it can answer, in
OpenAI's error schema; tests/unit/test_openapi_fuzz.py checks real responses against it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from loraplex.router.admin_adapters_api import AliasSet
from loraplex.router.errors import APIError
from loraplex.router.protocol import ChatCompletionRequest, CompletionRequest
from loraplex.router.tenancy.admin_api import KeyCreate, QuotaSet, TenantCreate
from loraplex.router.tenancy.auth import Authenticator

REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
# Admin endpoints read their bodies themselves too (parse_admin_body: one size limit, one
# error shape); (method, path) → the model that validates the body.
ADMIN_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("post", "/admin/tenants"): TenantCreate,
    ("post", "/admin/keys"): KeyCreate,
    ("put", "/admin/quotas"): QuotaSet,
    ("put", "/admin/adapters/{tenant}/{name}/aliases/{alias}"): AliasSet,
}

# Why each error status happens, as the contract says it.
_REASONS = {
    400: "Invalid request: malformed JSON or a field of the wrong type (named in `param`)",
    401: "No API key, or one that is not valid (once keys are required)",
    403: "The API key may not use this endpoint (a tenant key on an admin endpoint)",
    404: "Unknown model or adapter (also another tenant's), or unknown resource",
    409: "Conflicts with what exists (a tenant or alias of that name)",
    413: "Request body larger than `--max-request-body-mib`",
    429: "A quota is exhausted; `Retry-After` says when to retry",
    500: "The adapter exists but cannot be served (`adapter_load_failed`, `adapter_corrupt`)",
    501: "The engine does not implement this endpoint for the model",
    502: "The engine failed while answering",
    503: "No engine, database or adapter store available (`code` says which)",
    504: "The engine did not answer in time",
}
_COMPLETION_ERRORS = (400, 401, 404, 413, 429, 500, 501, 502, 503, 504)
_ADMIN_ERRORS = (400, 401, 403, 404, 409, 413, 503)
_MODELS_ERRORS = (401, 413, 503)
_PROBE_ERRORS = (413, 503)
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "string"},
    }
}


class ErrorDetail(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    message: str
    type: str
    """`invalid_request_error`, `authentication_error`, `permission_error`,
    `rate_limit_error`, `server_error` or `service_unavailable_error`."""
    param: str | None
    """The request field at fault, when one is."""
    code: str | None
    """A stable code (`model_not_found`, `database_unavailable`, …)."""


class ErrorResponse(BaseModel):
    """OpenAI's error body: every error the router answers has this shape."""

    error: ErrorDetail


def error_statuses(path: str, method: str) -> tuple[int, ...]:
    """The error statuses an operation can answer."""
    if path in REQUEST_MODELS:
        return _COMPLETION_ERRORS
    if path.startswith("/admin/"):
        return _ADMIN_ERRORS
    if path.startswith("/v1/"):
        return _MODELS_ERRORS
    return _PROBE_ERRORS


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=(
            "OpenAI-compatible router in front of vLLM serving many LoRA adapters. "
            "Completion bodies accept every field vLLM accepts; fields not listed pass "
            "through unchanged."
        ),
        routes=app.routes,
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    ref = "#/components/schemas/{model}"
    for model in (ErrorResponse, *REQUEST_MODELS.values(), *ADMIN_BODIES.values()):
        body = model.model_json_schema(ref_template=ref)
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
    # FastAPI's own validation answers 422; the router answers 400 (router/errors.py).
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error_content = {"application/json": {"schema": {"$ref": ref.format(model="ErrorResponse")}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            _document(path, method, operation, error_content)
    return schema


def _document(path: str, method: str, operation: dict, error_content: dict) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    model = ADMIN_BODIES.get((method, path))
    if method == "post" and path in REQUEST_MODELS:
        model = REQUEST_MODELS[path]
    if model is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    if path in REQUEST_MODELS:
        ok = responses.setdefault("200", {"description": "Successful Response"})
        ok["content"] = {
            "application/json": {"schema": {"type": "object"}},
            # Server-sent events: `data: {chunk}` lines, then `data: [DONE]` (not JSON).
            "text/event-stream": {},
        }
    if path.startswith(("/v1/", "/admin/")):
        # Open loopback mode needs no key: the empty requirement says so.
        operation["security"] = [{"bearer": []}, {}]
    for status in error_statuses(path, method):
        response: dict[str, Any] = {"description": _REASONS[status], "content": error_content}
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        responses[str(status)] = response


def admin_or_open(authenticator: Authenticator) -> Callable[[Request], Awaitable[None]]:
    """Who may read the contract: an admin key once keys are required (no key 401, a
    tenant key 403, like `/admin/*`); anyone in open loopback mode. It lists every admin
    operation and field, which a tenant has no use for."""

    async def authorize(request: Request) -> None:
        header = request.headers.get("authorization")
        principal = await run_in_threadpool(authenticator.authenticate, header)
        if principal.role == "tenant":
            raise APIError(
                403, "This API key may not read the API documentation.", code="admin_required"
            )

    return authorize


def install_openapi(app: FastAPI, authorize: Callable[[Request], Awaitable[None]]) -> None:
    """`/openapi.json`, `/docs` and `/redoc` for callers `authorize` lets through (it raises
    the 401/403 APIError). Create `app` with `openapi_url=None, docs_url=None,
    redoc_url=None` so FastAPI's open ones do not exist."""
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cached:
            cached.update(build_openapi(app))
        return cached

    app.openapi = openapi  # type: ignore[method-assign]
    router = APIRouter(dependencies=[Depends(authorize)], include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi_json() -> JSONResponse:
        return JSONResponse(openapi())

    @router.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} API")

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} API")

    app.include_router(router)
