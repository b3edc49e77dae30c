"""A database that goes away while the router runs (issue 12, item 13): every endpoint that
needs it answers the same 503 `database_unavailable` in OpenAI's error shape, none a 500,
and `/v1/models` does not answer 200 with the registry's adapters silently missing.

Two real outages: a PostgreSQL server the test stops, and a SQLite file replaced by a
folder (as root, permissions cannot make a file unreadable; a folder cannot be opened).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraplex import database
from loraplex.router.app import create_app
from loraplex.settings import ServeSettings
from tests.postgres_server import PostgresServer, PostgresUnavailable
from tests.unit.stub_replica import stub_replicas

ADMIN = {"Authorization": "Bearer admin-secret"}


@dataclass
class Outage:
    client: TestClient
    tenant: dict[str, str]
    """The tenant's key header (made before the outage)."""
    host_detail: str
    """A piece of the driver's message that names the database's location."""


def _stop_postgres(server: PostgresServer) -> None:
    server._run("pg_ctl", "-D", str(server.data), "-m", "fast", "-w", "stop")


def _break_sqlite(path: Path, url: str) -> None:
    for file in path.parent.glob(path.name + "*"):  # the file, its -wal and -shm
        file.unlink()
    path.mkdir()
    # Pooled connections still hold the deleted file open; new ones find a folder.
    database.shared_engine(url).dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    server: PostgresServer | None = None
    if request.param == "postgresql":
        try:
            server = PostgresServer()  # its own server: this test stops it
        except PostgresUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
        server.start()
        url, detail = server.url(), f"{server.port}"
    else:
        url, detail = f"sqlite:///{tmp_path}/loraplex.db", str(tmp_path)
    settings = ServeSettings(
        adapters_dir=tmp_path / "adapters",
        base_model_name="base",
        database_url=url,
        registry_store=str(tmp_path / "store"),
        registry_cache_dir=tmp_path / "cache",
        health_check_interval_s=3600.0,
        admin_key="admin-secret",
    )
    try:
        with (
            stub_replicas("a") as (replica,),
            TestClient(create_app(settings, [replica.url]), raise_server_exceptions=False) as c,
        ):
            assert c.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN).is_success
            key = c.post("/admin/keys", json={"tenant": "acme"}, headers=ADMIN).json()["key"]
            tenant = {"Authorization": f"Bearer {key}"}
            assert c.get("/v1/models", headers=tenant).status_code == 200
            if server is not None:
                _stop_postgres(server)
            else:
                _break_sqlite(tmp_path / "loraplex.db", url)
            yield Outage(c, tenant, detail)
    finally:
        if server is not None:
            server.stop()


COMPLETION = {"model": "base", "prompt": "hi", "max_tokens": 2}
# (method, path, body, as tenant): every endpoint that reads or writes the database.
ENDPOINTS = [
    ("GET", "/v1/models", None, False),
    ("GET", "/v1/models", None, True),
    ("POST", "/v1/completions", COMPLETION, True),
    ("POST", "/v1/completions", {**COMPLETION, "model": "acme/bot"}, False),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "acme/bot@stable", "messages": [{"role": "user", "content": "hi"}]},
        False,
    ),
    ("GET", "/admin/tenants", None, False),
    ("POST", "/admin/tenants", {"name": "beta"}, False),
    ("DELETE", "/admin/tenants/acme", None, False),
    ("GET", "/admin/keys", None, False),
    ("POST", "/admin/keys", {"tenant": "acme"}, False),
    ("DELETE", "/admin/keys/lpx-abcdef", None, False),
    ("GET", "/admin/quotas", None, False),
    ("PUT", "/admin/quotas", {"tenant": "acme", "requests_per_minute": 5}, False),
    ("DELETE", "/admin/quotas?tenant=acme", None, False),
    ("GET", "/admin/adapters", None, False),
    ("PUT", "/admin/adapters/acme/bot/aliases/stable", {"version": "v1"}, False),
    ("POST", "/admin/adapters/acme/bot/rollback", None, False),
    ("DELETE", "/admin/adapters/acme/bot/versions/v1", None, False),
    ("GET", "/ready", None, False),
]


def test_every_endpoint_answers_503_database_unavailable(outage: Outage) -> None:
    answers = {}
    for method, path, body, as_tenant in ENDPOINTS:
        headers = outage.tenant if as_tenant else ADMIN
        response = outage.client.request(method, path, json=body, headers=headers)
        error = response.json().get("error", {})
        answers[f"{method} {path} {'tenant' if as_tenant else 'admin'}"] = (
            response.status_code,
            error.get("type"),
            error.get("code"),
        )
        # The driver's message (host, port, file) stays in the log.
        assert outage.host_detail not in response.text, (path, response.text)
    expected = (503, "service_unavailable_error", "database_unavailable")
    assert {name: answer for name, answer in answers.items() if answer != expected} == {}
    # What needs no database keeps working (a documented choice, docs/serving.md): the
    # admin key is configured, not stored, and the base model needs no catalog lookup.
    response = outage.client.post("/v1/completions", json=COMPLETION, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert outage.client.get("/health").status_code == 200


def test_the_router_recovers_when_the_database_is_back(tmp_path: Path) -> None:
    """SQLite back in place: the next request is served again, no restart."""
    url = f"sqlite:///{tmp_path}/loraplex.db"
    settings = ServeSettings(
        adapters_dir=tmp_path / "adapters",
        base_model_name="base",
        database_url=url,
        registry_store=str(tmp_path / "store"),
        registry_cache_dir=tmp_path / "cache",
        health_check_interval_s=3600.0,
        admin_key="admin-secret",
    )
    with (
        stub_replicas("a") as (replica,),
        TestClient(create_app(settings, [replica.url]), raise_server_exceptions=False) as c,
    ):
        assert c.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN).is_success
        path = tmp_path / "loraplex.db"
        database.shared_engine(url).dispose()
        shutil.move(path, tmp_path / "saved.db")
        path.mkdir()
        assert c.get("/admin/tenants", headers=ADMIN).status_code == 503
        path.rmdir()
        shutil.move(tmp_path / "saved.db", path)
        response = c.get("/admin/tenants", headers=ADMIN)
        assert response.status_code == 200, response.text
        assert [t["name"] for t in response.json()["data"]] == ["acme"]
