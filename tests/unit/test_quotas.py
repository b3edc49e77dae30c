"""Quota arithmetic on a real database (SQLite and PostgreSQL), and one limit shared by several
processes."""

from __future__ import annotations

import multiprocessing

import pytest
import sqlalchemy as sa

from loraplex.database import create_db_engine
from loraplex.router.tenancy.quotas import QuotaExceeded, QuotaLedger
from loraplex.router.tenancy.store import TenancyStore, quota_leases, quotas
from tests.unit.tenancy_helpers import Clock, migrated_store


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(database_url: str, clock: Clock) -> TenancyStore:
    store = migrated_store(database_url, clock)
    store.create_tenant("acme")  # id 1
    store.create_tenant("globex")  # id 2
    return store


@pytest.fixture
def ledger(store: TenancyStore, clock: Clock) -> QuotaLedger:
    return QuotaLedger(store.engine, lease_s=600, clock=clock)


def test_no_quota_no_state(ledger: QuotaLedger) -> None:
    assert ledger.admit(1, "base") is None


def test_requests_per_minute_bursts_then_refills(
    store: TenancyStore, ledger: QuotaLedger, clock: Clock
) -> None:
    store.set_quota("acme", requests_per_minute=6)
    for _ in range(6):
        ledger.admit(1, "base")
    with pytest.raises(QuotaExceeded) as caught:
        ledger.admit(1, "base")
    assert (caught.value.limit, caught.value.retry_after_s) == ("requests_per_minute", 10)
    assert ledger.admit(2, "base") is None  # another tenant is unaffected
    clock.now += 9
    with pytest.raises(QuotaExceeded):
        ledger.admit(1, "base")  # a refused request costs nothing, but 9 s is not enough
    clock.now += 1
    ledger.admit(1, "base")  # after Retry-After, exactly one more
    with pytest.raises(QuotaExceeded):
        ledger.admit(1, "base")
    clock.now += 60
    for _ in range(6):
        ledger.admit(1, "base")  # a full minute refills the whole burst


def test_tokens_are_charged_after_the_response(
    store: TenancyStore, ledger: QuotaLedger, clock: Clock
) -> None:
    store.set_quota("acme", tokens_per_minute=1000)
    admission = ledger.admit(1, "base")
    assert admission is not None
    ledger.settle(admission, 1500)  # the request that crosses the limit completes
    with pytest.raises(QuotaExceeded) as caught:
        ledger.admit(1, "base")
    # 500 tokens over a 1000/min budget: 30 s until there is room again.
    assert (caught.value.limit, caught.value.retry_after_s) == ("tokens_per_minute", 30)
    clock.now += 30.5
    ledger.settle(ledger.admit(1, "base"), 10)  # type: ignore[arg-type]


def test_a_worst_case_beyond_the_tokens_left_is_refused_up_front(
    store: TenancyStore, ledger: QuotaLedger, clock: Clock
) -> None:
    store.set_quota("acme", tokens_per_minute=1000)
    store.set_quota("acme", "acme/bot", tokens_per_minute=100)
    with pytest.raises(QuotaExceeded) as caught:
        ledger.admit(1, "base", worst_case_tokens=1001)  # can never fit: lower max_tokens
    assert (caught.value.limit, caught.value.retry_after_s) == ("tokens_per_minute", 60)
    with pytest.raises(QuotaExceeded):
        ledger.admit(1, "acme/bot@stable", worst_case_tokens=101)  # the adapter's own limit
    ledger.settle(ledger.admit(1, "base", worst_case_tokens=1000), 600)  # type: ignore[arg-type]
    with pytest.raises(QuotaExceeded) as caught:
        ledger.admit(1, "base", worst_case_tokens=500)  # 400 left
    # 100 tokens short at 1000/min: 6 s; the refusal charged nothing.
    assert caught.value.retry_after_s == 6
    ledger.admit(1, "base", worst_case_tokens=400)
    ledger.admit(1, "base")  # no maximum in the body: not checked up front
    clock.now += 6
    ledger.admit(1, "base", worst_case_tokens=500)


def test_concurrency_leases_release_and_lapse(
    store: TenancyStore, ledger: QuotaLedger, clock: Clock
) -> None:
    store.set_quota("acme", max_concurrent=2)
    first, second = ledger.admit(1, "base"), ledger.admit(1, "base")
    with pytest.raises(QuotaExceeded) as caught:
        ledger.admit(1, "base")
    assert caught.value.limit == "max_concurrent"
    ledger.settle(first, 0)  # type: ignore[arg-type]
    third = ledger.admit(1, "base")
    assert third is not None and second is not None
    # A worker that died never settles: its lease lapses after lease_s.
    clock.now += 601
    ledger.admit(1, "base")
    ledger.admit(1, "base")


def test_lapsed_leases_are_deleted_when_the_quota_next_settles(
    store: TenancyStore, ledger: QuotaLedger, clock: Clock
) -> None:
    """Leases of a worker that died stop counting once lapsed and do not pile up: the next
    settlement of that quota deletes them with its own lease (and no other quota's)."""
    store.set_quota("acme", max_concurrent=2)
    store.set_quota("globex", max_concurrent=1)
    for _ in range(2):
        ledger.admit(1, "base")  # never settled: the worker died
    ledger.admit(2, "base")  # another tenant's running request
    clock.now += 601
    admission = ledger.admit(1, "base")
    assert admission is not None
    assert _leases(store) == {1: 3, 2: 1}
    ledger.settle(admission, 0)
    assert _leases(store) == {2: 1}


def _leases(store: TenancyStore) -> dict[int, int]:
    """Lease rows per tenant id."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(quotas.c.tenant_id, sa.func.count())
            .select_from(quota_leases.join(quotas))
            .group_by(quotas.c.tenant_id)
        ).all()
    return {tenant_id: count for tenant_id, count in rows}


def test_per_adapter_quota_applies_to_that_adapter_and_its_versions(
    store: TenancyStore, ledger: QuotaLedger
) -> None:
    store.set_quota("acme", "acme/chat", requests_per_minute=1)
    ledger.admit(1, "acme/chat")
    with pytest.raises(QuotaExceeded):
        ledger.admit(1, "acme/chat:v2")
    with pytest.raises(QuotaExceeded):
        ledger.admit(1, "acme/chat@prod")
    assert ledger.admit(1, "acme/other") is None


def test_a_refusal_by_one_quota_charges_no_other(store: TenancyStore, ledger: QuotaLedger) -> None:
    store.set_quota("acme", requests_per_minute=2)
    store.set_quota("acme", "acme/chat", max_concurrent=1)
    ledger.admit(1, "acme/chat")
    with pytest.raises(QuotaExceeded):
        ledger.admit(1, "acme/chat")  # concurrency: the tenant's request count is not taken
    ledger.admit(1, "base")  # so the second of the two per minute is still there


def _admit_many(url: str, attempts: int, results: multiprocessing.Queue) -> None:
    engine = create_db_engine(url)
    ledger = QuotaLedger(engine, lease_s=600)
    admitted = 0
    for _ in range(attempts):
        try:
            ledger.admit(1, "base")
            admitted += 1
        except QuotaExceeded:
            pass
    results.put(admitted)


def test_workers_share_one_limit(store: TenancyStore, database_url: str) -> None:
    """Four processes (router workers) race for 10 concurrency slots: exactly 10 win."""
    store.set_quota("acme", max_concurrent=10)
    url = database_url
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_admit_many, args=(url, 8, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    admitted = sum(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert admitted == 10
