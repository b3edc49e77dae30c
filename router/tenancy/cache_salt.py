"""Per-tenant prefix-cache isolation: the `cache_salt` the router puts on every completion.

vLLM shares its prefix cache between all requests whose first block hashes alike; a
request's `cache_salt` goes into that first hash (vllm/v1/core/kv_cache_utils.py), so
requests with different salts never share a cached block. Without salts, one tenant
could time another's prompts (a cached prefix answers several times faster) or read
`vllm:prefix_cache_hits_total` move.

- A tenant's salt is HMAC-SHA256(secret, tenant id): the same for all of the tenant's
  requests (its own prompts still hit the cache), different for every other tenant, and
  not guessable without the secret. It covers every model the tenant calls, `public/*`
  adapters and the base model included.
- Admin keys share one salt of their own (operators are one trust domain).
- Open loopback mode (no keys at all, so no tenants): no salt is added; the request
  reaches vLLM as the client sent it, `cache_salt` included.
- A client's own `cache_salt` (vLLM's API, to partition its users' caches) is kept as a
  partition inside the tenant: salt = HMAC(secret, tenant id + client salt). Replacing it
  would silently merge the caches of the client's own users; passing it through would
  let a tenant pick another tenant's salt.
- The secret is the router-to-engine key (`backend_api_key`): every router in front of
  the same engines has it, so a tenant's salt is the same whichever router it reaches.
  Without one, a random secret per router process (isolation holds; a tenant's cache is
  not shared across router processes).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from loraplex.router.errors import APIError
from loraplex.router.tenancy.auth import Principal

# vLLM's own limits on `cache_salt` (vllm/entrypoints/generate/base/protocol.py
# validate_cache_salt): a client gets the same 400 through the router as without it.
MAX_CLIENT_SALT_CHARS = 128
_FORBIDDEN_SALT_CHARS = frozenset("@/\\\x00")
_DOMAIN = b"loraplex cache_salt v1\x00"


class CacheSalts:
    def __init__(self, secret: str = "") -> None:
        """`secret`: shared by all routers in front of the same engines; empty = random."""
        key = secret.encode() if secret else secrets.token_bytes(32)
        # A key for this use only (kept apart from the secret's other uses).
        self._key = hmac.new(key, _DOMAIN, hashlib.sha256).digest()

    def salt(self, principal: Principal, client_salt: object) -> str | None:
        """The `cache_salt` to send vLLM for this caller, or None to send the client's own
        unchanged (open mode). Raises a 400 APIError for a client salt vLLM would refuse."""
        if principal.role == "anonymous":
            return None
        _check_client_salt(client_salt)
        owner = f"tenant:{principal.tenant_id}" if principal.role == "tenant" else "admin"
        partition = client_salt.encode() if isinstance(client_salt, str) else b""
        message = owner.encode() + b"\x00" + partition
        # 64 hex characters: within vLLM's 128 and free of the characters it refuses.
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


def _check_client_salt(client_salt: object) -> None:
    if client_salt is None:
        return
    if not isinstance(client_salt, str) or not client_salt:
        raise APIError(
            400,
            "Parameter 'cache_salt' must be a non-empty string if provided.",
            param="cache_salt",
        )
    if len(client_salt) > MAX_CLIENT_SALT_CHARS or any(
        char in _FORBIDDEN_SALT_CHARS for char in client_salt
    ):
        raise APIError(
            400,
            f"Parameter 'cache_salt' must be at most {MAX_CLIENT_SALT_CHARS} characters and "
            "must not contain '@', '/', '\\\\', or NUL.",
            param="cache_salt",
        )
