"""Who is calling (`Authorization: Bearer <key>`) and which models they may use.

- Admin: the `admin_key` setting or an admin key from the database; sees and calls every
  model and manages tenants, keys and quotas.
- Tenant: a tenant's key; sees and calls the base model, `public/*` and its own
  `<tenant>/*` adapters. Anything else answers 404 exactly like a missing model.
- Anonymous: nobody configured any tenant or admin key (the safe default, loopback only
  unless `allow_open_access`): every model, no admin endpoints.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

from loraplex.router.errors import APIError
from loraplex.router.tenancy.store import KeyRejected, TenancyStore

log = logging.getLogger(__name__)

SHARED_OWNER = "public"


@dataclass(frozen=True)
class Principal:
    role: Literal["admin", "tenant", "anonymous"]
    tenant: str | None = None
    tenant_id: int | None = None
    key_prefix: str | None = None
    """The key's public prefix (safe to log), None for the admin_key setting and anonymous."""

    @property
    def label(self) -> str:
        """The `tenant` value in metrics and logs."""
        return self.tenant if self.role == "tenant" and self.tenant else self.role


ANONYMOUS = Principal("anonymous")


def adapter_owner(model: str) -> str | None:
    """The tenant part of `tenant/name[:version|@alias]`; None for a bare name."""
    return model.split("/", 1)[0] if "/" in model else None


def may_use(principal: Principal, model: str, base_model_name: str) -> bool:
    if principal.role != "tenant":
        return True
    if model == base_model_name:
        return True
    return adapter_owner(model) in (SHARED_OWNER, principal.tenant)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# The one answer to every presented key that is not usable (unknown, wrong, revoked,
# expired): saying which, or echoing the key's prefix, would tell the holder of a leaked
# key whether it was ever real. Operators find the reason in the router's log.
INVALID_API_KEY = "Invalid API key."


def unauthorized(message: str = INVALID_API_KEY) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    def __init__(
        self, store: TenancyStore, admin_key: str, open_allowed: bool, recheck_s: float = 1.0
    ) -> None:
        self.store = store
        # Compared by digest so the comparison time says nothing about the key.
        self._admin_digest = hashlib.sha256(admin_key.encode()).digest() if admin_key else None
        self.open_allowed = open_allowed
        # Whether keys are required is re-read at most every `recheck_s`: open mode then
        # costs no database query per request, and the first tenant closes it within a second.
        self.recheck_s = recheck_s
        self._required = True
        self._checked_at = -math.inf

    def keys_required(self) -> bool:
        if self._admin_digest is not None:
            return True
        now = time.monotonic()
        if now - self._checked_at >= self.recheck_s:
            self._required = self.store.keys_required()
            self._checked_at = now
        return self._required

    def open_mode_principal(self) -> Principal | None:
        """ANONYMOUS when the last check (under `recheck_s` ago) found no keys at all and
        open access is allowed; None when only `authenticate` can tell. It needs no
        database, so the guard calls it on the event loop and skips the hop to a worker
        thread (about 0.1-0.4 ms per request on this 2-core machine)."""
        if self._admin_digest is not None or self._required or not self.open_allowed:
            return None
        if time.monotonic() - self._checked_at >= self.recheck_s:
            return None
        return ANONYMOUS

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an Authorization header, or a 401 APIError.

        Blocking (database); call it from a worker thread.
        """
        key = _bearer_token(authorization)
        if key and self._admin_digest is not None:
            digest = hashlib.sha256(key.encode()).digest()
            if hmac.compare_digest(digest, self._admin_digest):
                return Principal("admin")
        if not self.keys_required():
            if self.open_allowed:
                # Clients must send some key (the openai SDK insists); in open mode it is ignored.
                return ANONYMOUS
            raise unauthorized("No API keys are configured and open access is not allowed.")
        if not key:
            if authorization:
                raise unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        try:
            owner = self.store.authenticate(key)
        except KeyRejected as exc:
            log.info("API key rejected", extra={"reason": str(exc)})
            raise unauthorized() from None
        role: Literal["admin", "tenant"] = "admin" if owner.tenant_id is None else "tenant"
        return Principal(role, owner.tenant, owner.tenant_id, owner.prefix)


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def check_startup_access(host: str, allow_open_access: bool, keys_required: bool) -> None:
    """Refuse to serve without keys on a non-loopback address unless explicitly allowed."""
    if keys_required:
        log.info("API keys required (tenants or admin keys are configured)")
        return
    if is_loopback(host):
        log.warning(
            "no tenants or admin keys configured: serving WITHOUT API keys on loopback",
            extra={"host": host},
        )
        return
    if allow_open_access:
        log.warning(
            "no tenants or admin keys configured: serving WITHOUT API keys on a non-loopback "
            "address because allow_open_access is set",
            extra={"host": host},
        )
        return
    raise RuntimeError(
        f"refusing to serve without API keys on {host}: create a tenant and key "
        "(`loraplex tenants create NAME`, `loraplex keys create --tenant NAME`), set "
        "LORAPLEX_ADMIN_KEY, bind to 127.0.0.1, or set LORAPLEX_ALLOW_OPEN_ACCESS=true"
    )
