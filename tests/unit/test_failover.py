"""The router in front of several stand-in replicas (real HTTP servers on loopback, no
engine): failover of requests and streams, the retry budget, no replica at all, one
quota charge per retried request, /ready and /health, and adapter affinity end to end."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi.testclient import TestClient

from loraplex.database import create_db_engine, migrate
from loraplex.router.app import create_app
from loraplex.router.metrics import (
    BACKEND_EJECTIONS,
    BACKEND_IN_FLIGHT,
    BACKEND_RETRIES,
    BACKEND_UP,
    PICKER_DECISIONS,
    RETRY_BUDGET_EXHAUSTED,
    STREAM_INTERRUPTIONS,
)
from loraplex.router.picker import rendezvous_score
from loraplex.router.tenancy.store import TenancyStore, quotas
from loraplex.settings import ServeSettings
from tests.unit.registry_helpers import bound_url, uvicorn_in_thread
from tests.unit.stub_replica import StubReplica, closed_port_url, stub_replicas


def value(metric, **labels) -> float:  # type: ignore[no-untyped-def]
    return (metric.labels(**labels) if labels else metric)._value.get()


def make_settings(tmp_path: Path, **overrides: object) -> ServeSettings:
    for name in ("alpha", "beta"):
        folder = tmp_path / "adapters" / "demo" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"")
    fields: dict = {
        "adapters_dir": tmp_path / "adapters",
        "base_model_name": "base",
        "database_url": f"sqlite:///{tmp_path}/loraplex.db",
        "registry_store": str(tmp_path / "store"),
        "registry_cache_dir": tmp_path / "cache",
        # Background probes would race the tests' own steps; tests probe explicitly.
        "health_check_interval_s": 3600.0,
    }
    return ServeSettings(**{**fields, **overrides})


@dataclass
class Router:
    client: TestClient
    replicas: list[StubReplica]

    def complete(self, model: str = "base", stream: bool = False, **headers: str):  # type: ignore[no-untyped-def]
        body = {"model": model, "prompt": "hi", "stream": stream}
        return self.client.post("/v1/completions", json=body, headers=headers)

    def answered_by(self, response) -> str:  # type: ignore[no-untyped-def]
        """The replica that answered (a stream: its first event; it must end with [DONE])."""
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", events
            return json.loads(events[0])["choices"][0]["text"]
        return response.json()["choices"][0]["text"]


@pytest.fixture
def router(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Router]:
    overrides = getattr(request, "param", {})
    with stub_replicas("a", "b") as replicas:
        settings = make_settings(tmp_path, **overrides)
        app = create_app(settings, [r.url for r in replicas])
        with TestClient(app) as client:
            yield Router(client, replicas)


# ---- failover of non-streamed requests ----------------------------------------------------

FAILURES = [
    ("killed", "connect"),
    ("reset", "reset"),
    ("status:502", "status_502"),
    ("status:503", "status_503"),
    ("engine-dead", "engine_dead"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["request", "stream"])
@pytest.mark.parametrize(("failure", "reason"), FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failed_replica_is_answered_by_the_other(
    router: Router, failure: str, reason: str, stream: bool
):
    a, b = router.replicas
    retries = value(BACKEND_RETRIES, reason=reason)
    if failure == "killed":
        a.stop()
    else:
        a.mode = failure
    # The base model goes to the least-loaded replica, the first one on a tie: `a`.
    response = router.complete(stream=stream)
    assert router.answered_by(response) == "b"
    assert b.requests == ["base"]
    assert len(a.requests) == (0 if failure == "killed" else 1)
    assert value(BACKEND_RETRIES, reason=reason) == retries + 1


NOT_RETRIED = [("status:400", 400), ("status:404", 404), ("status:504", 504)]


@pytest.mark.parametrize(("failure", "status"), NOT_RETRIED, ids=[f[0] for f in NOT_RETRIED])
def test_client_errors_and_timeouts_are_not_retried(router: Router, failure: str, status: int):
    a, b = router.replicas
    a.mode = failure
    response = router.complete()
    assert response.status_code == status
    assert response.json()["error"]["message"] == f"a says {status}"
    assert a.requests == ["base"] and b.requests == []


def test_a_request_is_retried_once_only(tmp_path: Path):
    with stub_replicas("a", "b", "c") as (a, b, c):
        a.mode = b.mode = "status:503"
        app = create_app(make_settings(tmp_path), [a.url, b.url, c.url])
        with TestClient(app) as client:
            response = client.post("/v1/completions", json={"model": "base", "prompt": "x"})
        assert response.status_code == 503
        assert response.json()["error"]["message"] == "b says 503"
        assert (len(a.requests), len(b.requests), c.requests) == (1, 1, [])


# ---- streams ----------------------------------------------------------------------------


def test_a_stream_failing_before_its_first_byte_is_retried(router: Router):
    a, b = router.replicas
    a.mode = "headers-only"
    response = router.complete(stream=True)
    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["text"] == "b"
    assert a.requests == ["base"] and b.requests == ["base"]


def test_a_stream_whose_engine_died_before_its_first_token_is_retried(router: Router):
    a, b = router.replicas
    a.mode = "engine-dead"
    retries = value(BACKEND_RETRIES, reason="engine_dead")
    response = router.complete(stream=True)
    assert response.status_code == 200
    assert "EngineCore" not in response.text
    assert json.loads(response.text.split("data: ")[1])["choices"][0]["text"] == "b"
    assert value(BACKEND_RETRIES, reason="engine_dead") == retries + 1
    assert a.requests == ["base"] and b.requests == ["base"]


def test_a_dead_engine_with_nowhere_else_to_go_is_503_with_retry_after(tmp_path: Path):
    with stub_replicas("a") as (a,):
        a.mode = "engine-dead"
        with TestClient(create_app(make_settings(tmp_path), [a.url])) as client:
            response = client.post("/v1/completions", json={"model": "base", "prompt": "x"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "backend_unavailable"
        assert "retry-after" in response.headers


def test_a_stream_broken_after_its_first_byte_ends_with_an_error_event(router: Router):
    a, b = router.replicas
    a.mode = "break"
    interruptions = value(STREAM_INTERRUPTIONS)
    response = router.complete(stream=True)
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "a"  # what the client already had
    error = json.loads(events[1])["error"]
    assert error["code"] == "stream_interrupted" and error["type"] == "server_error"
    assert events[2:] == ["[DONE]"]
    assert b.requests == []  # never retried: the client had part of an answer
    assert value(STREAM_INTERRUPTIONS) == interruptions + 1


def test_no_request_is_left_counted_in_flight(router: Router):
    a, _ = router.replicas
    for mode, stream in [("ok", True), ("break", True), ("reset", False), ("status:400", False)]:
        a.mode = mode
        router.complete("demo/alpha", stream=stream)
        router.complete(stream=stream)
    for replica in router.replicas:
        assert value(BACKEND_IN_FLIGHT, backend=replica.url) == 0


def test_a_client_leaving_a_stream_frees_its_replica(tmp_path: Path):
    with stub_replicas("a") as (a,):
        a.event_delay_s = 1.0  # the whole stream would take 3 s
        app = create_app(make_settings(tmp_path), [a.url])
        config = uvicorn.Config(app, port=0, log_level="error")
        with uvicorn_in_thread(config) as server:
            assert server.started
            body = {"model": "base", "prompt": "x", "stream": True}
            url = f"{bound_url(server)}/v1/completions"
            with httpx.stream("POST", url, json=body, timeout=10) as response:
                lines = response.iter_lines()  # held: a dropped iterator closes the stream
                assert next(lines).startswith("data: ")
                assert value(BACKEND_IN_FLIGHT, backend=a.url) == 1
            deadline = time.monotonic() + 1.0  # before the stream would have ended
            while value(BACKEND_IN_FLIGHT, backend=a.url) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert value(BACKEND_IN_FLIGHT, backend=a.url) == 0


# ---- the retry budget, and no replica at all ---------------------------------------------


@pytest.mark.parametrize("router", [{"retry_budget_ratio": 0.0}], indirect=True)
def test_no_retry_when_the_budget_is_spent(router: Router):
    a, b = router.replicas
    a.mode = "status:503"
    exhausted = value(RETRY_BUDGET_EXHAUSTED)
    response = router.complete()
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "a says 503"
    assert b.requests == []
    assert value(RETRY_BUDGET_EXHAUSTED) == exhausted + 1


def test_no_replica_up_is_503_with_retry_after_at_once(tmp_path: Path):
    app = create_app(make_settings(tmp_path), [closed_port_url(), closed_port_url()])
    with TestClient(app) as client:
        for stream in (False, True):
            started = time.monotonic()
            body = {"model": "demo/alpha", "prompt": "x", "stream": stream}
            response = client.post("/v1/completions", json=body)
            assert time.monotonic() - started < 1.0
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "backend_unavailable"
            assert int(response.headers["retry-after"]) >= 1


def test_replicas_failing_requests_are_ejected_and_skipped(tmp_path: Path):
    with stub_replicas("a", "b") as (a, b):
        a.mode = "status:503"  # a dying engine whose /health still answers
        app = create_app(make_settings(tmp_path, eject_after_failures=2), [a.url, b.url])
        ejections = value(BACKEND_EJECTIONS, backend=a.url, reason="errors")
        with TestClient(app) as client:
            for _ in range(4):
                response = client.post("/v1/completions", json={"model": "base", "prompt": "x"})
                assert response.json()["choices"][0]["text"] == "b"
            assert len(a.requests) == 2  # ejected after its second failure, then skipped
            assert value(BACKEND_EJECTIONS, backend=a.url, reason="errors") == ejections + 1
            assert value(BACKEND_UP, backend=a.url) == 0
            assert client.get("/ready").json()["replicas"] == {"up": 1, "total": 2}


def test_backends_from_settings_by_url_list_and_by_dns(tmp_path: Path):
    with stub_replicas("a", "b") as (a, b):
        for source in (
            {"backend_url": f"{a.url}, {b.url}/"},
            {"backend_discovery": f"dns:localhost:{a.port}"},
        ):
            with TestClient(create_app(make_settings(tmp_path, **source))) as client:
                ready = client.get("/ready").json()
                response = client.post("/v1/completions", json={"model": "base", "prompt": "x"})
            assert response.json()["choices"][0]["text"] in {"a", "b"}
            # A list of two; `localhost` may also resolve to ::1, where nothing listens.
            assert ready["replicas"]["up"] == (2 if "backend_url" in source else 1)


# ---- quotas: one request, one charge ------------------------------------------------------


def test_a_retried_request_is_charged_once(tmp_path: Path):
    settings = make_settings(tmp_path)
    engine = create_db_engine(settings.resolved_database_url())
    migrate(engine)
    store = TenancyStore(engine)
    store.create_tenant("acme")
    key, _ = store.create_key("acme")
    # 7 tokens per answer against 60 a minute: one charge moves the bucket 7 s ahead.
    store.set_quota("acme", tokens_per_minute=60, requests_per_minute=2, max_concurrent=1)
    with stub_replicas("a", "b") as (a, b):
        a.mode = "reset"
        with TestClient(create_app(settings, [a.url, b.url])) as client:
            auth = {"Authorization": f"Bearer {key}"}
            body = {"model": "base", "prompt": "x"}
            before = time.time()
            first = client.post("/v1/completions", json=body, headers=auth)
            assert first.json()["choices"][0]["text"] == "b" and len(a.requests) == 1
            with engine.connect() as conn:
                token_tat = conn.execute(sa.select(quotas.c.token_tat)).scalar_one()
            assert before + 7 - 0.5 <= token_tat <= time.time() + 7 + 0.5  # 7 tokens, not 14
            # The lease was released once and one request taken: a second one is admitted
            # (max_concurrent 1, 2 per minute), a third is over the request limit.
            a.mode = "ok"
            assert client.post("/v1/completions", json=body, headers=auth).status_code == 200
            third = client.post("/v1/completions", json=body, headers=auth)
            assert third.status_code == 429
            assert "2 requests per minute" in third.json()["error"]["message"]


# ---- /ready and /health -----------------------------------------------------------------


class Watch:
    def __init__(self, restarting: bool) -> None:
        self.is_restarting = restarting

    def restarting(self) -> bool:
        return self.is_restarting


def test_ready_counts_replicas_and_health_follows_the_engine_watch(tmp_path: Path):
    with stub_replicas("a", "b") as (a, b):
        watch = Watch(restarting=False)
        app = create_app(make_settings(tmp_path), [a.url, b.url], engine_watch=watch)
        with TestClient(app) as client:
            ready = client.get("/ready")
            assert ready.status_code == 200
            assert ready.json() == {
                "status": "ready",
                "replicas": {"up": 2, "total": 2},
                "database": "up",
            }
            a.stop()
            b.stop()
            # Connection refused from both: passive failures eject them (3 in a row each).
            for _ in range(3):
                client.post("/v1/completions", json={"model": "base", "prompt": "x"})
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "backend_unavailable"
            assert "retry-after" in ready.headers
            assert client.get("/health").status_code == 503  # nothing up, nothing restarting
            watch.is_restarting = True
            assert client.get("/health").status_code == 200  # an engine is coming back


def test_health_without_an_engine_watch_is_liveness_only(tmp_path: Path):
    app = create_app(make_settings(tmp_path), closed_port_url())
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 503
        assert client.get("/health").status_code == 200


# ---- the picker, end to end ---------------------------------------------------------------


def test_an_adapter_keeps_going_to_its_home_replica(router: Router):
    home = max(router.replicas, key=lambda r: rendezvous_score("demo/alpha", r.url))
    hits = value(PICKER_DECISIONS, decision="affinity_hit")
    served = {router.answered_by(router.complete("demo/alpha")) for _ in range(6)}
    assert served == {home.name}
    assert value(PICKER_DECISIONS, decision="affinity_hit") == hits + 5  # the first: a miss
    # The base model spreads by load, never blocked by the adapter's home.
    assert router.answered_by(router.complete()) in {"a", "b"}


@pytest.mark.parametrize("router", [{"picker": "round-robin"}], indirect=True)
def test_round_robin_ignores_where_an_adapter_is(router: Router):
    served = [router.answered_by(router.complete("demo/alpha")) for _ in range(4)]
    assert sorted(served) == ["a", "a", "b", "b"]


def test_backend_metrics_carry_each_replicas_label(router: Router):
    text = router.client.get("/metrics/backend").text
    assert text.count("# TYPE vllm:up gauge") == 1
    for replica in router.replicas:
        assert f'vllm:up{{backend="{replica.url}",r="{replica.name}"}} 1' in text
