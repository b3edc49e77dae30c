"""The backend pool on its own: health checks, ejection and re-admission, DNS discovery
joining and dropping replicas, the router's record of held adapters, the retry budget
and the merged /metrics/backend exposition."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.router.backend_pool import (
    BackendPool,
    HeldAdapters,
    parse_discovery,
    resolve_addresses,
)
from loraplex.router.metrics import BACKEND_EJECTIONS, BACKEND_REPLICAS, BACKEND_UP
from loraplex.router.metrics_api import merge_expositions
from loraplex.router.retry_budget import RetryBudget
from tests.unit.registry_helpers import free_port
from tests.unit.stub_replica import StubReplica, stub_replicas


def value(metric, **labels) -> float:  # type: ignore[no-untyped-def]
    return metric.labels(**labels)._value.get()


def test_failed_probes_eject_and_passing_probes_readmit():
    async def scenario(replica: StubReplica) -> None:
        pool = BackendPool([replica.url], eject_after_failures=3, readmit_after_successes=2)
        (member,) = pool.replicas
        ejections = value(BACKEND_EJECTIONS, backend=replica.url, reason="health_check")
        await pool.check_health()
        member.held.claim("lpx-one")
        replica.healthy = False
        for _ in range(2):
            await pool.check_health()
        assert pool.up() == [member]  # two failures are not yet three
        await pool.check_health()
        assert pool.up() == []
        assert value(BACKEND_UP, backend=replica.url) == 0
        assert value(BACKEND_REPLICAS, state="ejected") == 1
        assert value(BACKEND_EJECTIONS, backend=replica.url, reason="health_check") == (
            ejections + 1
        )
        replica.healthy = True
        await pool.check_health()
        assert pool.up() == []  # one pass is not yet two
        await pool.check_health()
        assert pool.up() == [member]
        assert value(BACKEND_UP, backend=replica.url) == 1
        # It restarted, most likely: the router no longer claims it holds anything.
        assert "lpx-one" not in member.held
        await pool.close()

    with stub_replicas("a") as (replica,):
        asyncio.run(scenario(replica))


def test_a_replica_never_seen_healthy_is_ejected_by_its_first_failed_probe():
    async def scenario(dead: str, alive: str) -> None:
        pool = BackendPool([dead, alive])
        await pool.check_health()
        assert [r.url for r in pool.up()] == [alive]
        await pool.close()

    with stub_replicas("a") as (replica,):
        asyncio.run(scenario(f"http://127.0.0.1:{free_port()}", replica.url))


def test_request_failures_eject_and_a_success_resets_the_count():
    pool = BackendPool(["http://a:1"], eject_after_failures=3)
    (member,) = pool.replicas
    pool.record_failure(member)
    pool.record_failure(member)
    pool.record_success(member)
    pool.record_failure(member)
    pool.record_failure(member)
    assert pool.up() == [member]
    pool.record_failure(member)
    assert pool.up() == []


def test_dns_discovery_joins_new_addresses_and_drops_vanished_ones():
    port = free_port()
    answers: dict[str, list[str] | None] = {"now": ["127.0.0.1", "127.0.0.2"]}

    async def resolver(host: str, port_: int) -> list[str]:
        assert (host, port_) == ("vllm-headless", port)
        if answers["now"] is None:
            raise OSError("SERVFAIL")
        return answers["now"]

    async def scenario() -> None:
        pool = BackendPool(discovery=("vllm-headless", port), resolver=resolver)
        await pool.discover()
        assert [r.url for r in pool.up()] == [
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.2:{port}",
        ]
        kept = pool.get(f"http://127.0.0.2:{port}")
        kept.held.claim("lpx-one")
        # One pod goes, a new one comes whose server does not answer yet (nothing on ::1).
        answers["now"] = ["127.0.0.2", "::1"]
        await pool.discover()
        assert [r.url for r in pool.replicas] == [
            f"http://127.0.0.2:{port}",
            f"http://[::1]:{port}",
        ]
        assert pool.up() == [kept] and "lpx-one" in kept.held  # same replica, same record
        answers["now"] = None  # a failed lookup must not empty the pool
        await pool.discover()
        assert len(pool.replicas) == 2
        await pool.close()

    a, b = StubReplica("a", "127.0.0.1", port), StubReplica("b", "127.0.0.2", port)
    a.start()
    b.start()
    try:
        asyncio.run(scenario())
    finally:
        a.stop()
        b.stop()


def test_dns_discovery_resolves_for_real_and_probes_what_it_finds():
    async def scenario(port: int) -> None:
        assert "127.0.0.1" in await resolve_addresses("localhost", port)
        pool = BackendPool(discovery=("localhost", port))
        await pool.start()  # resolve + probe, then keep doing both in the background
        assert f"http://127.0.0.1:{port}" in [r.url for r in pool.up()]
        await pool.close()

    with stub_replicas("a") as (replica,):
        asyncio.run(scenario(replica.port))


DISCOVERY_SPECS = [
    ("dns:vllm-headless:8100", ("vllm-headless", 8100)),
    ("dns:vllm.ns.svc.cluster.local:80", ("vllm.ns.svc.cluster.local", 80)),
    ("vllm-headless:8100", None),
    ("dns:vllm-headless", None),
    ("dns::8100", None),
    ("dns:host:port", None),
]


@pytest.mark.parametrize(("spec", "parsed"), DISCOVERY_SPECS)
def test_parse_discovery(spec: str, parsed: tuple[str, int] | None):
    if parsed is None:
        with pytest.raises(ValueError, match="dns:HOST:PORT"):
            parse_discovery(spec)
    else:
        assert parse_discovery(spec) == parsed


def test_held_adapters_are_a_bounded_lru():
    held = HeldAdapters(capacity=2)
    assert held.claim("a") and held.claim("b")
    assert not held.claim("a")  # already held: no load; now most recently used
    assert held.claim("c")  # evicts b, the least recently used
    assert held.frozen() == {"a", "c"}


def test_the_retry_budget_is_a_share_of_the_last_minute():
    now = [1000.0]
    budget = RetryBudget(0.1, min_retries=2, clock=lambda: now[0])
    assert budget.try_spend() and budget.try_spend()  # the floor, with no traffic yet
    assert not budget.try_spend()
    for _ in range(50):
        budget.record_request()
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]  # 5 = 10 % of 50
    now[0] += 61  # the window has rolled past all of it
    assert budget.try_spend() and budget.try_spend() and not budget.try_spend()
    never = RetryBudget(0.0)
    for _ in range(100):
        never.record_request()
    assert not never.try_spend()


def test_backend_metrics_are_merged_per_family_with_a_backend_label():
    scrape = (
        "# HELP vllm:requests Requests.\n# TYPE vllm:requests counter\n"
        'vllm:requests_total{model="m"} {n}\n'
        "# HELP vllm:kv Cache use.\n# TYPE vllm:kv gauge\nvllm:kv {n}\n"
    )
    merged = merge_expositions(
        [("http://a:1", scrape.replace("{n}", "1")), ("http://b:1", scrape.replace("{n}", "2"))]
    )
    assert merged.splitlines() == [
        "# HELP vllm:requests Requests.",
        "# TYPE vllm:requests counter",
        'vllm:requests_total{backend="http://a:1",model="m"} 1',
        'vllm:requests_total{backend="http://b:1",model="m"} 2',
        "# HELP vllm:kv Cache use.",
        "# TYPE vllm:kv gauge",
        'vllm:kv{backend="http://a:1"} 1',
        'vllm:kv{backend="http://b:1"} 2',
    ]
