"""Who may read the metrics, and what a caller can make them say.

`/metrics` and `/metrics/backend` carry every tenant's name and traffic and vLLM's
prefix-cache counters: once keys exist only an admin key reads them (401 / 403 in OpenAI's
error shape, like `/admin/*`), open loopback mode stays open, and a real Prometheus
scrapes them with the admin key from a file as deploy/prometheus/prometheus.yml does.
Adapter label values go only to adapters that exist and that the caller may use: 300
made-up names do not push another tenant's real adapter into `other`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
import yaml
from fastapi.testclient import TestClient

from loraplex.adapters.blob_store import open_blob_store
from loraplex.adapters.catalog import Catalog
from loraplex.adapters.publish import PublishChecks, publish_adapter
from loraplex.adapters.refs import parse_registry_name
from loraplex.database import shared_engine
from loraplex.router.app import create_app
from loraplex.router.metrics import OVERFLOW_LABEL
from loraplex.router.tenancy.guard import APIGuard
from loraplex.router.tenancy.store import TenancyStore
from loraplex.settings import ServeSettings
from tests.unit.registry_helpers import free_port, make_adapter_dir, uvicorn_in_thread
from tests.unit.stub_replica import StubReplica

ADMIN_KEY = "admin-secret-123"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Router:
    client: TestClient
    settings: ServeSettings
    replica: StubReplica

    def key(self, tenant: str | None) -> dict[str, str]:
        """A new key for `tenant` (None: an admin key from the database)."""
        body = {"tenant": tenant} if tenant else {"admin": True}
        response = self.client.post("/admin/keys", json=body, headers=ADMIN)
        assert response.status_code == 201, response.text
        return {"authorization": f"Bearer {response.json()['key']}"}

    def tenant(self, name: str) -> dict[str, str]:
        response = self.client.post("/admin/tenants", json={"name": name}, headers=ADMIN)
        assert response.status_code == 201, response.text
        return self.key(name)

    def publish(self, name: str, seed: int) -> None:
        folder = make_adapter_dir(Path(self.settings.registry_store).parent / name, seed=seed)
        publish_adapter(
            folder,
            parse_registry_name(name),
            catalog=Catalog.open(self.settings.resolved_database_url()),
            store=open_blob_store(self.settings.registry_store),
            checks=PublishChecks(max_lora_rank=16, max_bytes=1 << 30),
        )


def _settings(tmp_path: Path, database_url: str, **overrides: object) -> ServeSettings:
    fields: dict = {
        "adapters_dir": tmp_path / "adapters",
        "base_model_name": "base",
        "database_url": database_url,
        "registry_store": str(tmp_path / "store"),
        "registry_cache_dir": tmp_path / "cache",
    }
    return ServeSettings(**{**fields, **overrides})


@pytest.fixture
def replica() -> Iterator[StubReplica]:
    stub = StubReplica("r0").start()
    try:
        yield stub
    finally:
        stub.stop()


def _router(tmp_path: Path, database_url: str, replica: StubReplica, **overrides: object):
    settings = _settings(tmp_path, database_url, **overrides)
    return settings, create_app(settings, replica.url)


@pytest.fixture
def keyed(tmp_path: Path, database_url: str, replica: StubReplica) -> Iterator[Router]:
    settings, app = _router(tmp_path, database_url, replica, admin_key=ADMIN_KEY)
    with TestClient(app) as client:
        yield Router(client, settings, replica)


# ---- who may read them ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/metrics/backend"])
def test_metrics_need_an_admin_key_once_keys_exist(keyed: Router, path: str) -> None:
    tenant_key = keyed.tenant(f"t{uuid.uuid4().hex[:8]}")
    database_admin_key = keyed.key(None)

    for headers in ({}, {"authorization": "Bearer lpx_wrong"}, {"authorization": "Basic eA=="}):
        response = keyed.client.get(path, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        # Exactly what an admin endpoint answers to the same header.
        assert keyed.client.get("/admin/tenants", headers=headers).json() == response.json()

    response = keyed.client.get(path, headers=tenant_key)
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert response.json()["error"]["code"] == "admin_required"

    for headers in (ADMIN, database_admin_key):
        response = keyed.client.get(path, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        expected = "loraplex_backend_up" if path == "/metrics" else 'vllm:up{backend="'
        assert expected in response.text


def test_metrics_during_a_database_outage(keyed: Router, tmp_path: Path) -> None:
    """The admin key setting needs no database; a key that must be looked up gets the
    router's one answer to an outage, 503 `database_unavailable`, never a 500."""
    guard = next(m for m in keyed.client.app.user_middleware if m.cls is APIGuard)
    store = guard.kwargs["authenticator"].store
    store.engine = sa.create_engine(f"sqlite:///{tmp_path}/missing-dir/loraplex.db")
    assert keyed.client.get("/metrics", headers=ADMIN).status_code == 200
    response = keyed.client.get("/metrics", headers={"authorization": "Bearer lpx_some_key"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "database_unavailable"


def test_metrics_need_a_key_with_tenants_and_no_admin_key_setting(
    tmp_path: Path, database_url: str, replica: StubReplica
) -> None:
    _, app = _router(tmp_path, database_url, replica)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 200  # no key anywhere yet: open
        # The CLI's way in (no admin key setting): a tenant and an admin key in the database.
        store = TenancyStore(shared_engine(database_url))
        store.create_tenant("acme")
        admin = {"authorization": f"Bearer {store.create_key(None)[0]}"}
        tenant_key = {"authorization": f"Bearer {store.create_key('acme')[0]}"}
        deadline = time.monotonic() + 5  # open mode ends within the authenticator's recheck
        while client.get("/metrics").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=tenant_key).status_code == 403
        assert client.get("/metrics", headers=admin).status_code == 200


def test_open_loopback_mode_keeps_metrics_open(
    tmp_path: Path, database_url: str, replica: StubReplica
) -> None:
    _, app = _router(tmp_path, database_url, replica)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 200
        response = client.get("/metrics/backend")
        assert response.status_code == 200 and "vllm:up" in response.text


# ---- what a caller can make them say ----------------------------------------------------


def test_made_up_names_do_not_use_up_the_adapter_labels(keyed: Router) -> None:
    """A tenant sends 300 made-up names (more than the 200 label values), with and without
    a valid body, in its own and another tenant's namespace; another tenant's real adapter
    is then still reported under its own name."""
    run = uuid.uuid4().hex[:8]  # the metric registry is global to the test process
    attacker, victim = f"a{run}", f"v{run}"
    attacker_key, victim_key = keyed.tenant(attacker), keyed.tenant(victim)
    keyed.publish(f"{victim}/bot", seed=1)
    statuses: dict[int, int] = {}
    for i in range(300):
        model = f"{attacker}/fake-{i}" if i % 3 else f"{victim}/fake-{i}"
        body = {"model": model, "prompt": "hi"} if i % 2 else {"model": model}  # 400 / 404
        status = keyed.client.post("/v1/completions", json=body, headers=attacker_key).status_code
        statuses[status] = statuses.get(status, 0) + 1
    assert statuses == {400: 150, 404: 150}

    response = keyed.client.post(
        "/v1/completions", json={"model": f"{victim}/bot", "prompt": "hi"}, headers=victim_key
    )
    assert response.status_code == 200, response.text
    text = keyed.client.get("/metrics", headers=ADMIN).text
    assert (
        f'loraplex_requests_total{{adapter="{victim}/bot",status="200",tenant="{victim}"}} 1.0'
        in text
    )
    assert "fake-" not in text
    for status in ("400", "404"):
        sample = (
            f'loraplex_requests_total{{adapter="unknown",status="{status}",tenant="{attacker}"}}'
        )
        assert f"{sample} 150.0" in text
    assert f'adapter="{OVERFLOW_LABEL}",status="200",tenant="{victim}"' not in text


def test_a_made_up_name_whose_client_left_takes_no_label(keyed: Router, database_url: str) -> None:
    """The client leaves while the router still looks the name up (the catalog held by a
    table lock on PostgreSQL, where lookups run off the event loop): no status came back,
    and the made-up name still gets no label of its own."""
    if not database_url.startswith("postgresql"):
        pytest.skip("on SQLite the lookup runs inline and cannot be interrupted")
    attacker = f"a{uuid.uuid4().hex[:8]}"
    key = keyed.tenant(attacker)

    async def leave_during_lookup() -> None:
        transport = httpx.ASGITransport(app=keyed.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            body = {"model": f"{attacker}/made-up", "prompt": "hi"}
            request = asyncio.create_task(client.post("/v1/completions", json=body, headers=key))
            await asyncio.sleep(0.5)
            assert not request.done()  # waiting on the lock
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request

    locker = sa.create_engine(database_url)
    try:
        with locker.connect() as conn, conn.begin():
            conn.execute(sa.text("LOCK TABLE registry_adapters IN ACCESS EXCLUSIVE MODE"))
            asyncio.run(leave_during_lookup())
    finally:
        locker.dispose()
    text = keyed.client.get("/metrics", headers=ADMIN).text
    assert "made-up" not in text
    assert (
        f'loraplex_requests_total{{adapter="unknown",status="500",tenant="{attacker}"}} 1.0' in text
    )


# ---- a real Prometheus scrapes them -----------------------------------------------------


def _prometheus_query(url: str, query: str) -> list[dict]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": query}), timeout=5
    ) as answer:
        return json.load(answer)["data"]["result"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_real_prometheus_scrapes_with_the_deployed_credentials(
    tmp_path: Path, replica: StubReplica
) -> None:
    """The router job of deploy/prometheus/prometheus.yml (its `authorization` block, the
    key read from a file) against a real router: scraped (up 1) with the admin key, refused
    (up 0) with a wrong one."""
    deployed = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in deployed["scrape_configs"] if j["job_name"] == "loraplex-router")
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"].startswith("/run/secrets/")

    settings = _settings(tmp_path, f"sqlite:///{tmp_path}/loraplex.db", admin_key=ADMIN_KEY)
    router_port = free_port()
    config = uvicorn.Config(
        create_app(settings, replica.url), host="127.0.0.1", port=router_port, log_level="error"
    )
    (tmp_path / "admin-key").write_text(ADMIN_KEY + "\n")  # as written by `echo` or a Secret
    (tmp_path / "wrong-key").write_text("not-the-key\n")

    def scrape_job(name: str, key_file: str) -> dict:
        return {
            **job,
            "job_name": name,
            "scrape_interval": "1s",
            "authorization": {**job["authorization"], "credentials_file": key_file},
            "static_configs": [{"targets": [f"127.0.0.1:{router_port}"]}],
        }

    prometheus_config = {
        "scrape_configs": [
            scrape_job("loraplex-router", str(tmp_path / "admin-key")),
            scrape_job("wrong-key", str(tmp_path / "wrong-key")),
        ]
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config))
    prometheus_port = free_port()
    url = f"http://127.0.0.1:{prometheus_port}"
    with uvicorn_in_thread(config) as server:
        assert server.started
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            up: dict[str, str] = {}
            while time.monotonic() < deadline:
                try:
                    up = {r["metric"]["job"]: r["value"][1] for r in _prometheus_query(url, "up")}
                except OSError:
                    up = {}
                if len(up) == 2:
                    break
                assert process.poll() is None, "prometheus exited"
                time.sleep(0.5)
            assert up == {"loraplex-router": "1", "wrong-key": "0"}
            samples = _prometheus_query(url, 'loraplex_backend_up{job="loraplex-router"}')
            # (The gauge is global to the test process: other tests' backends are there too.)
            assert replica.url in {sample["metric"]["backend"] for sample in samples}
        finally:
            process.terminate()
            process.wait(timeout=20)


# ---- the deployments hand Prometheus the key --------------------------------------------


def test_compose_mounts_the_admin_key_where_prometheus_reads_it() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    deployed = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in deployed["scrape_configs"] if j["job_name"] == "loraplex-router")
    [secret] = compose["services"]["prometheus"]["secrets"]
    assert job["authorization"]["credentials_file"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret] == {"environment": "LORAPLEX_ADMIN_KEY"}
    assert "LORAPLEX_ADMIN_KEY" in json.dumps(compose["services"]["router"]["environment"])


def test_helm_service_monitor_sends_the_admin_key_to_the_router_only() -> None:
    from tests.unit.test_deploy_helm import FULL, find, render

    for values, secret in (
        (FULL, "lp-loraplex-secrets"),
        ({**FULL, "auth": {"existingSecret": "ops-keys"}}, "ops-keys"),
    ):
        docs = render(values)
        router = find(docs, "ServiceMonitor", "lp-loraplex-router")["spec"]["endpoints"][0]
        assert router["authorization"] == {
            "type": "Bearer",
            "credentials": {"name": secret, "key": "admin-key"},
        }
        vllm = find(docs, "ServiceMonitor", "lp-loraplex-vllm")["spec"]["endpoints"][0]
        assert "authorization" not in vllm
