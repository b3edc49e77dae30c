"""Per-tenant (and per-adapter) quotas whose state lives in the database, so every router
worker and replica sharing the database enforces one limit together.

- Requests and tokens per minute are token buckets (GCRA): a tenant may burst up to the
  per-minute limit, and capacity refills continuously at that rate. A bucket is one
  number per quota row (its "theoretical arrival time"), so no per-request rows pile up.
- Tokens are known only when a response ends, so they are charged then: the request that
  crosses the limit completes, and later ones get 429 until the debt has refilled.
- Concurrent requests are leases (one row per running request), released when the
  response ends; a lease of a worker that died lapses after `lease_s` (it stops counting
  then, and is deleted by the next settlement of that quota).

Each admission locks the tenant's quota rows first (an UPDATE: a row lock on PostgreSQL,
the write lock on SQLite), so two workers never both take the last unit.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy import Engine

from loraplex.router.tenancy.store import quota_leases, quotas

PERIOD_S = 60.0


class QuotaExceeded(Exception):
    def __init__(self, limit: str, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        """The limit that was hit: requests_per_minute, tokens_per_minute or max_concurrent."""
        self.retry_after_s = max(1, math.ceil(retry_after_s))


@dataclass
class Admission:
    """What one admitted request holds until `QuotaLedger.settle`."""

    token_quota_ids: list[int] = field(default_factory=list)
    lease_ids: list[int] = field(default_factory=list)
    lease_quota_ids: list[int] = field(default_factory=list)
    """The concurrency quotas its leases count against (their lapsed leases go at settle)."""


# The quotas that apply to one request: the tenant's own ("" adapter) and the one for the
# requested adapter. Built once with bound parameters: every keyed request checks them,
# and constructing a SQLAlchemy statement costs more than running it on SQLite.
_APPLIES = (quotas.c.tenant_id == sa.bindparam("for_tenant")) & (
    (quotas.c.adapter == "") | (quotas.c.adapter == sa.bindparam("for_adapter"))
)
_ANY_QUOTA = sa.select(quotas.c.id).where(_APPLIES).limit(1)
# Locks the rows (a no-op write) and reads them in one statement (RETURNING: SQLite 3.35+,
# PostgreSQL); each statement costs the router ~0.1 ms of SQLAlchemy work on SQLite.
_LOCK_AND_READ = (
    quotas.update().where(_APPLIES).values(request_tat=quotas.c.request_tat).returning(*quotas.c)
)
# Leases that have not lapsed; lapsed ones are deleted at settle (see `settle`).
_LIVE_LEASES = sa.select(sa.func.count()).where(
    quota_leases.c.quota_id == sa.bindparam("quota_id"),
    quota_leases.c.expires_at > sa.bindparam("now"),
)
_SET_REQUEST_TAT = (
    quotas.update()
    .where(quotas.c.id == sa.bindparam("quota_id"))
    .values(request_tat=sa.bindparam("new_tat"))
)


def quota_adapter_name(model: str) -> str:
    """The adapter a per-adapter quota names: `model` without `:version` or `@alias`."""
    return model.split("@", 1)[0].split(":", 1)[0]


def _check_worst_case(
    tokens_per_minute: int, token_tat: float, now: float, worst_case: int, scope: str
) -> None:
    """QuotaExceeded when `worst_case` tokens exceed what the bucket holds now."""
    remaining = tokens_per_minute * (now + PERIOD_S - max(token_tat, now)) / PERIOD_S
    if worst_case <= remaining:
        return
    if worst_case > tokens_per_minute:
        raise QuotaExceeded(
            "tokens_per_minute",
            PERIOD_S,
            f"This request may generate {worst_case} tokens (n × max_tokens), more than the "
            f"limit of {tokens_per_minute} tokens per minute{scope}: lower max_tokens or n.",
        )
    # When the bucket has refilled enough for the worst case.
    wait = max(token_tat, now) + worst_case * PERIOD_S / tokens_per_minute - PERIOD_S - now
    raise QuotaExceeded(
        "tokens_per_minute",
        wait,
        f"Rate limit reached: this request may generate {worst_case} tokens (n × max_tokens), "
        f"{int(remaining)} of {tokens_per_minute} tokens per minute are left{scope}.",
    )


class QuotaLedger:
    def __init__(
        self, engine: Engine, lease_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.lease_s = lease_s
        self.clock = clock

    def admit(
        self, tenant_id: int, model: str, worst_case_tokens: int | None = None
    ) -> Admission | None:
        """Take one request from every quota that applies, or raise QuotaExceeded.

        `worst_case_tokens` (n × max_tokens) beyond a token bucket's remaining capacity is
        refused up front (the bucket is only read: tokens are charged at `settle`).
        None when no quota applies (no write to the database at all).
        """
        which = {"for_tenant": tenant_id, "for_adapter": quota_adapter_name(model)}
        with self.engine.connect() as conn:
            if conn.execute(_ANY_QUOTA, which).first() is None:
                return None
        with self.engine.begin() as conn:
            # Lock first (see module docstring): the state read is the state the lock protects.
            rows = sorted(conn.execute(_LOCK_AND_READ, which).all(), key=lambda row: row.id)
            now = self.clock()
            new_request_tats: dict[int, float] = {}
            for row in rows:
                scope = f" for {row.adapter}" if row.adapter else ""
                if row.tokens_per_minute and row.token_tat >= now + PERIOD_S:
                    raise QuotaExceeded(
                        "tokens_per_minute",
                        row.token_tat - PERIOD_S - now,
                        f"Rate limit reached: {row.tokens_per_minute} tokens per minute{scope}.",
                    )
                if row.tokens_per_minute and worst_case_tokens:
                    _check_worst_case(
                        row.tokens_per_minute, row.token_tat, now, worst_case_tokens, scope
                    )
                if row.max_concurrent:
                    live = {"quota_id": row.id, "now": now}
                    running = conn.execute(_LIVE_LEASES, live).scalar_one()
                    if running >= row.max_concurrent:
                        raise QuotaExceeded(
                            "max_concurrent",
                            1,
                            f"Concurrency limit reached: {row.max_concurrent} requests at "
                            f"once{scope}.",
                        )
                if row.requests_per_minute:
                    new_tat = max(row.request_tat, now) + PERIOD_S / row.requests_per_minute
                    if new_tat - PERIOD_S > now:
                        raise QuotaExceeded(
                            "requests_per_minute",
                            new_tat - PERIOD_S - now,
                            f"Rate limit reached: {row.requests_per_minute} requests per "
                            f"minute{scope}.",
                        )
                    new_request_tats[row.id] = new_tat
            for quota_id, tat in new_request_tats.items():
                conn.execute(_SET_REQUEST_TAT, {"quota_id": quota_id, "new_tat": tat})
            admission = Admission([row.id for row in rows if row.tokens_per_minute])
            token = uuid.uuid4().hex
            for row in rows:
                if row.max_concurrent:
                    result = conn.execute(
                        quota_leases.insert().values(
                            quota_id=row.id, request_id=token, expires_at=now + self.lease_s
                        )
                    )
                    admission.lease_ids.append(int(result.inserted_primary_key[0]))
                    admission.lease_quota_ids.append(row.id)
            return admission

    def settle(self, admission: Admission, tokens: int) -> None:
        """Charge the tokens a request used and release its concurrency leases, with any
        lapsed lease of the same quotas (a worker that died never settles its own; they
        no longer count at admission, and go here rather than in every admission)."""
        if not admission.lease_ids and not (tokens and admission.token_quota_ids):
            return
        with self.engine.begin() as conn:
            if tokens and admission.token_quota_ids:
                now = self.clock()
                # One statement per row: atomic without a separate lock.
                start = sa.case((quotas.c.token_tat > now, quotas.c.token_tat), else_=now)
                conn.execute(
                    quotas.update()
                    .where(quotas.c.id.in_(admission.token_quota_ids))
                    .values(token_tat=start + (tokens * PERIOD_S) / quotas.c.tokens_per_minute)
                )
            if admission.lease_ids:
                lapsed = quota_leases.c.quota_id.in_(admission.lease_quota_ids) & (
                    quota_leases.c.expires_at <= self.clock()
                )
                conn.execute(
                    quota_leases.delete().where(quota_leases.c.id.in_(admission.lease_ids) | lapsed)
                )
