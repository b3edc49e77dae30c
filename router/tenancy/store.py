"""Tenants, API keys and quota settings in the loraplex database (Alembic branch `tenancy`).

Keys are 256-bit random tokens stored only as their SHA-256: a fast hash is safe for
random secrets (there is no dictionary to try) and lets a request find its key with one
indexed lookup, where a slow password hash would have to be tried against every key.
The first 12 characters (`lpx_` + 8) are kept in clear as the key's public name, the
only part `keys list` shows. Every request reads the key row, so a revocation or
expiry takes effect on the next request of every router worker, without a restart.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from loraplex.adapters.names import InvalidAdapterName, parse_adapter_name

_T = TypeVar("_T")

KEY_PREFIX = "lpx_"
_PREFIX_LENGTH = len(KEY_PREFIX) + 8
# Names with a meaning of their own: shared adapters, and the metric labels of callers
# that are not a tenant.
RESERVED_TENANT_NAMES = frozenset({"public", "admin", "anonymous", "none", "other", "unknown"})

metadata = sa.MetaData()
tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(32), nullable=False, unique=True),
    # NULL tenant = an admin key.
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), index=True),
    sa.Column("description", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("revoked_at", sa.Float),
)
quotas = sa.Table(
    "quotas",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    ),
    # "" = every request of the tenant; otherwise one adapter name (`tenant/name`).
    sa.Column("adapter", sa.String(200), nullable=False, server_default=""),
    sa.Column("requests_per_minute", sa.Integer),
    sa.Column("tokens_per_minute", sa.Integer),
    sa.Column("max_concurrent", sa.Integer),
    sa.Column("request_tat", sa.Float, nullable=False, server_default="0"),
    sa.Column("token_tat", sa.Float, nullable=False, server_default="0"),
    sa.UniqueConstraint("tenant_id", "adapter", name="uq_quotas_tenant_adapter"),
)
quota_leases = sa.Table(
    "quota_leases",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "quota_id",
        sa.Integer,
        sa.ForeignKey("quotas.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)


class TenancyError(ValueError):
    """A bad value for a field; `field` names it (CLI message, API `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(TenancyError):
    """The named tenant, key or quota does not exist."""


class AlreadyExists(TenancyError):
    """A tenant (or key prefix) with that name exists already."""


class KeyRejected(Exception):
    """The presented key is unknown, revoked or expired; the message says which."""


@dataclass(frozen=True)
class Tenant:
    name: str
    created_at: float
    active_keys: int


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    tenant: str | None
    """None for an admin key."""
    description: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True)
class KeyOwner:
    """Who a valid key belongs to."""

    prefix: str
    tenant: str | None
    tenant_id: int | None


@dataclass(frozen=True)
class Quota:
    tenant: str
    adapter: str
    """"" = all requests of the tenant; otherwise one adapter name."""
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None


# Every keyed request runs this lookup: built once with a bound parameter, because
# constructing a SQLAlchemy statement costs more than running it on SQLite.
_KEY_OWNER = (
    sa.select(
        api_keys.c.prefix,
        tenants.c.name,
        api_keys.c.tenant_id,
        api_keys.c.expires_at,
        api_keys.c.revoked_at,
    )
    .select_from(api_keys.outerjoin(tenants, api_keys.c.tenant_id == tenants.c.id))
    .where(api_keys.c.key_hash == sa.bindparam("key_hash"))
)


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def validate_tenant_name(name: str) -> str:
    try:
        parsed = parse_adapter_name(name)
    except InvalidAdapterName as exc:
        raise TenancyError("tenant", str(exc).replace("model name", "tenant name")) from None
    if parsed.tenant is not None:
        raise TenancyError("tenant", "a tenant name cannot contain '/'")
    if name.lower() in RESERVED_TENANT_NAMES:
        raise TenancyError("tenant", f"'{name}' is reserved")
    return name


# ASCII digits only (`\d` also takes "٣"), and few enough that the sum stays a float.
_DURATION = re.compile(r"([0-9]{1,9})\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_expiry(text: str, now: float) -> float:
    """`30d`, `12h`, `15m`, `90s`, `2w` from now, or an ISO 8601 date/time (UTC if no zone)."""
    text = text.strip()
    match = _DURATION.fullmatch(text)
    if match:
        seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
        if seconds <= 0:
            raise TenancyError("expires", "the duration must be positive")
        return now + seconds
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TenancyError(
            "expires", f"{text!r} is neither a duration (30d, 12h, 15m, 90s) nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    expires_at = moment.timestamp()
    if expires_at <= now:
        raise TenancyError("expires", f"{text} is in the past")
    return expires_at


QUOTA_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")


def _positive_or_none(field: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise TenancyError(field, "must be at least 1 (null or `--clear` removes the limit)")
    return value


class TenancyStore:
    """CRUD for tenants, keys and quotas, and the per-request key lookup."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    # Tenants

    def create_tenant(self, name: str) -> Tenant:
        validate_tenant_name(name)
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                # Names are unique ignoring case (`acme` and `ACME` would be one tenant to a
                # reader). Checked in the insert's transaction; the unique index decides
                # exact duplicates (a lower(name) index needs a migration).
                same = sa.select(tenants.c.id).where(sa.func.lower(tenants.c.name) == name.lower())
                if conn.execute(same).first() is not None:
                    raise AlreadyExists("tenant", f"tenant '{name}' already exists")
                conn.execute(tenants.insert().values(name=name, created_at=now))
        except IntegrityError:
            # The unique name decides (checking first would race another writer).
            raise AlreadyExists("tenant", f"tenant '{name}' already exists") from None
        return Tenant(name, now, 0)

    def list_tenants(self) -> list[Tenant]:
        now = self.clock()
        active = (
            sa.select(sa.func.count())
            .where(
                api_keys.c.tenant_id == tenants.c.id,
                api_keys.c.revoked_at.is_(None),
                sa.or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > now),
            )
            .scalar_subquery()
        )
        query = sa.select(tenants.c.name, tenants.c.created_at, active).order_by(tenants.c.name)
        with self.engine.connect() as conn:
            return [Tenant(*row) for row in conn.execute(query)]

    def delete_tenant(
        self, name: str, also: Callable[[sa.Connection], _T] | None = None
    ) -> _T | None:
        """Deletes the tenant with its keys and quotas. `also` runs in the same transaction
        (router/tenancy/tenant_adapters.py deletes the tenant's registry adapters there, so
        no moment exists where the tenant is gone and its adapters are not); its result is
        returned."""
        with self.engine.begin() as conn:
            tenant_id = self._tenant_id(conn, name, lock=True)
            result = also(conn) if also is not None else None
            # Explicit deletes rather than ON DELETE CASCADE alone: SQLite enforces foreign
            # keys only on connections that enabled them.
            quota_ids = sa.select(quotas.c.id).where(quotas.c.tenant_id == tenant_id)
            conn.execute(quota_leases.delete().where(quota_leases.c.quota_id.in_(quota_ids)))
            conn.execute(quotas.delete().where(quotas.c.tenant_id == tenant_id))
            conn.execute(api_keys.delete().where(api_keys.c.tenant_id == tenant_id))
            conn.execute(tenants.delete().where(tenants.c.id == tenant_id))
        return result

    def require_tenant(self, name: str) -> None:
        """Raises NotFound naming the tenant unless it exists (exact name, as adapter names
        and keys match it)."""
        with self.engine.connect() as conn:
            self._tenant_id(conn, name)

    def has_tenants(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(tenants.c.id).limit(1)).first() is not None

    def _tenant_id(self, conn: sa.Connection, name: str, lock: bool = False) -> int:
        """The tenant's id; `lock` holds its row until the transaction ends, so writers of
        one tenant's quotas take turns: each reads what the one before it wrote. Without it
        two "read, then update or insert" writers both insert (measured: 7 of 8 concurrent
        `quotas set` failed on the unique key, on PostgreSQL and on SQLite).

        The lock is a write that changes nothing: a row lock on PostgreSQL, the database's
        write lock on SQLite, where SELECT ... FOR UPDATE is a plain SELECT that Python's
        driver does not even run inside the transaction."""
        if lock:
            conn.execute(tenants.update().where(tenants.c.name == name).values(name=tenants.c.name))
        tenant_id = conn.execute(sa.select(tenants.c.id).where(tenants.c.name == name)).scalar()
        if tenant_id is None:
            raise NotFound("tenant", f"no tenant named '{name}'")
        return int(tenant_id)

    # Keys

    def create_key(
        self, tenant: str | None, expires_at: float | None = None, description: str = ""
    ) -> tuple[str, KeyInfo]:
        """A new key for `tenant` (None = admin key). The raw key is returned only here."""
        if len(description) > 200:
            raise TenancyError("description", "at most 200 characters")
        now = self.clock()
        if expires_at is not None and expires_at <= now:
            raise TenancyError("expires", "the expiry time is in the past")
        with self.engine.begin() as conn:
            tenant_id = self._tenant_id(conn, tenant) if tenant is not None else None
            while True:
                raw = KEY_PREFIX + secrets.token_urlsafe(32)
                prefix = raw[:_PREFIX_LENGTH]
                taken = sa.select(api_keys.c.id).where(api_keys.c.prefix == prefix)
                if conn.execute(taken).first() is None:
                    break
            conn.execute(
                api_keys.insert().values(
                    key_hash=hash_key(raw),
                    prefix=prefix,
                    tenant_id=tenant_id,
                    description=description,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
        return raw, KeyInfo(prefix, tenant, description, now, expires_at, None)

    def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        query = (
            sa.select(
                api_keys.c.prefix,
                tenants.c.name,
                api_keys.c.description,
                api_keys.c.created_at,
                api_keys.c.expires_at,
                api_keys.c.revoked_at,
            )
            .select_from(api_keys.outerjoin(tenants, api_keys.c.tenant_id == tenants.c.id))
            .order_by(api_keys.c.created_at, api_keys.c.id)
        )
        with self.engine.connect() as conn:
            if tenant is not None:
                query = query.where(api_keys.c.tenant_id == self._tenant_id(conn, tenant))
            return [KeyInfo(*row) for row in conn.execute(query)]

    def revoke_key(self, prefix: str) -> KeyInfo:
        with self.engine.begin() as conn:
            result = conn.execute(
                api_keys.update()
                .where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            )
            if result.rowcount == 0:
                exists = sa.select(api_keys.c.id).where(api_keys.c.prefix == prefix)
                if conn.execute(exists).first() is None:
                    raise NotFound("prefix", f"no key with prefix '{prefix}'")
        return next(k for k in self.list_keys() if k.prefix == prefix)

    def authenticate(self, raw_key: str) -> KeyOwner:
        """The owner of a usable key; KeyRejected says why a key is not usable."""
        with self.engine.connect() as conn:
            row = conn.execute(_KEY_OWNER, {"key_hash": hash_key(raw_key)}).first()
        if row is None:
            raise KeyRejected("Invalid API key.")
        if row.revoked_at is not None:
            raise KeyRejected(f"API key {row.prefix}… has been revoked.")
        if row.expires_at is not None and row.expires_at <= self.clock():
            raise KeyRejected(f"API key {row.prefix}… has expired.")
        return KeyOwner(row.prefix, row.name, row.tenant_id)

    def keys_required(self) -> bool:
        """True once any tenant or admin key exists: from then on every call needs a key."""
        with self.engine.connect() as conn:
            if conn.execute(sa.select(tenants.c.id).limit(1)).first() is not None:
                return True
            admin = sa.select(api_keys.c.id).where(
                api_keys.c.tenant_id.is_(None), api_keys.c.revoked_at.is_(None)
            )
            return conn.execute(admin.limit(1)).first() is not None

    def ping(self) -> None:
        """Raises if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(sa.select(tenants.c.id).limit(1))

    # Quotas

    def set_quota(self, tenant: str, adapter: str = "", **changes: int | None) -> Quota:
        """Change the limits of a tenant (or of one adapter for that tenant), creating the
        quota if needed: a limit given a number is set, one given None is removed, one not
        given keeps its value (none, for a new quota)."""
        if adapter:
            try:
                parse_adapter_name(adapter)
            except InvalidAdapterName as exc:
                raise TenancyError("adapter", str(exc)) from None
        for field, value in changes.items():
            if field not in QUOTA_LIMITS:
                raise TenancyError(field, f"not a quota limit ({', '.join(QUOTA_LIMITS)})")
            _positive_or_none(field, value)
        if not changes:
            raise TenancyError(
                "requests_per_minute", f"give at least one limit ({', '.join(QUOTA_LIMITS)})"
            )
        with self.engine.begin() as conn:
            # Locked: "update, else insert" by two writers at once would insert twice.
            tenant_id = self._tenant_id(conn, tenant, lock=True)
            where = (quotas.c.tenant_id == tenant_id, quotas.c.adapter == adapter)
            columns = [quotas.c[field] for field in QUOTA_LIMITS]
            # FOR UPDATE: two admins changing different limits at once both take effect.
            row = conn.execute(sa.select(*columns).where(*where).with_for_update()).first()
            limits = dict(zip(QUOTA_LIMITS, row or (None,) * len(QUOTA_LIMITS), strict=True))
            limits.update(changes)
            if all(value is None for value in limits.values()):
                raise TenancyError(
                    next(iter(changes)),
                    f"give at least one limit ({', '.join(QUOTA_LIMITS)}); "
                    "a quota without limits is removed with `quotas delete`",
                )
            if row is not None:
                conn.execute(quotas.update().where(*where).values(**limits))
            else:
                conn.execute(
                    quotas.insert().values(
                        tenant_id=tenant_id,
                        adapter=adapter,
                        request_tat=0.0,
                        token_tat=0.0,
                        **limits,
                    )
                )
        return Quota(tenant, adapter, **limits)

    def list_quotas(self, tenant: str | None = None) -> list[Quota]:
        query = (
            sa.select(
                tenants.c.name,
                quotas.c.adapter,
                quotas.c.requests_per_minute,
                quotas.c.tokens_per_minute,
                quotas.c.max_concurrent,
            )
            .select_from(quotas.join(tenants, quotas.c.tenant_id == tenants.c.id))
            .order_by(tenants.c.name, quotas.c.adapter)
        )
        if tenant is not None:
            query = query.where(tenants.c.name == tenant)
        with self.engine.connect() as conn:
            return [Quota(*row) for row in conn.execute(query)]

    def delete_quota(self, tenant: str, adapter: str = "") -> None:
        with self.engine.begin() as conn:
            tenant_id = self._tenant_id(conn, tenant, lock=True)
            quota_id = conn.execute(
                sa.select(quotas.c.id).where(
                    quotas.c.tenant_id == tenant_id, quotas.c.adapter == adapter
                )
            ).scalar()
            if quota_id is None:
                what = f"adapter '{adapter}' of " if adapter else ""
                raise NotFound("adapter" if adapter else "tenant", f"no quota for {what}'{tenant}'")
            conn.execute(quota_leases.delete().where(quota_leases.c.quota_id == quota_id))
            conn.execute(quotas.delete().where(quotas.c.id == quota_id))
