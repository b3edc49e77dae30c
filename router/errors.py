"""OpenAI-shaped API errors, and the one place domain errors become HTTP responses.

Request handling raises `APIError` where it knows the status itself; the domain layers
(registry catalog, adapter store, tenancy store, the database driver) raise their own
exceptions, and `api_error_for` maps them here, once, for every endpoint. So a database
failure is the same 503 `database_unavailable` on `/v1/models`, `/admin/tenants` and a
completion, and no endpoint keeps a private list of what to catch.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from loraplex.adapters.blob_store import StoreUnavailable
from loraplex.adapters.catalog import CatalogConflict, CatalogLookupError
from loraplex.adapters.names import InvalidAdapterName
from loraplex.router.tenancy.store import AlreadyExists, NotFound, TenancyError

log = logging.getLogger(__name__)

# OpenAI's error `type` for each status the router produces.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "server_error",
}

DATABASE_RETRY_AFTER_S = 5
"""Retry-After of a database outage: a restart or fail-over of the database takes seconds."""


class APIError(Exception):
    """Raised anywhere in request handling; becomes OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code),
        status_code=error.status,
        headers=error.headers,
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def database_unavailable() -> APIError:
    """Every database failure, on every endpoint. The driver's message stays in the log:
    it names hosts, ports and sometimes users, nothing a client should read."""
    return APIError(
        503,
        "The database is unavailable; retry shortly.",
        code="database_unavailable",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


def api_error_for(exc: Exception) -> APIError | None:
    """The API error a domain exception means, or None for one that is a bug (a 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SQLAlchemyError):
        log.error("database error: %s: %s", type(exc).__name__, _first_line(exc))
        return database_unavailable()
    if isinstance(exc, StoreUnavailable):
        log.error("adapter store unavailable: %s", exc)
        return APIError(503, f"Adapter store unavailable: {exc}", code="store_unavailable")
    if isinstance(exc, InvalidAdapterName):
        return APIError(400, str(exc), param="name")
    if isinstance(exc, CatalogLookupError):
        return APIError(404, str(exc), param="name", code="not_found")
    if isinstance(exc, CatalogConflict):
        return APIError(409, str(exc), param="name", code="conflict")
    # Tenancy: NotFound and AlreadyExists are TenancyErrors, so they come first.
    if isinstance(exc, NotFound):
        return APIError(404, str(exc), param=exc.field, code="not_found")
    if isinstance(exc, AlreadyExists):
        return APIError(409, str(exc), param=exc.field, code="already_exists")
    if isinstance(exc, TenancyError):
        return APIError(400, str(exc), param=exc.field)
    return None


DOMAIN_ERRORS: tuple[type[Exception], ...] = (
    SQLAlchemyError,
    StoreUnavailable,
    InvalidAdapterName,
    CatalogLookupError,
    CatalogConflict,
    TenancyError,
)
"""The exception classes `api_error_for` maps (the app installs one handler for them)."""


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's own validation (query and path parameters): a 400 naming the field, in
    words, instead of its 422 with a list of dicts."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "Invalid request")
    first = errors[0]
    # ("query", "force") → "force": the parameter as the client spells it.
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    return APIError(400, f"Invalid field '{field}': {message}", param=field)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves `app` as OpenAI's error JSON with its status."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
        error = api_error_for(exc)
        if error is None:  # not reached: DOMAIN_ERRORS are exactly what it maps
            raise exc
        return error_response(error)

    for kind in DOMAIN_ERRORS:
        app.add_exception_handler(kind, _domain_error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own 404 and 405. A 405 must carry `Allow` with every method the path
        # takes (RFC 9110); Starlette's names only the first route that matched the path.
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, f"Internal error: {type(exc).__name__}"), 500)


def _allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return methods


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
