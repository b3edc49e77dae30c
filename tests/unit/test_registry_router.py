"""The router with the registry, against a stand-in vLLM server (no engine) that loads
adapters on first request as the plugin's resolvers do: name forms, hot-swap on publish
and alias change, loads counted once per adapter and replica, the router's bounded record
of held adapters, and the bad-input table (400 / 404 / corrupt blob / store down)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from loraplex.adapters.blob_cache import BlobCache
from loraplex.adapters.blob_store import BlobMissing, StoreUnavailable, open_blob_store
from loraplex.adapters.catalog import Catalog, VersionRecord
from loraplex.adapters.content import BlobCorrupt, digest_of_version_id
from loraplex.adapters.local_store import LocalAdapterStore
from loraplex.adapters.publish import PublishChecks, publish_adapter
from loraplex.adapters.refs import parse_registry_name
from loraplex.router.app import create_app
from loraplex.router.metrics import ADAPTER_LOADS
from loraplex.settings import ServeSettings
from tests.unit.registry_helpers import FakeVLLM, free_port, make_adapter_dir

CHECKS = PublishChecks(max_lora_rank=16, max_bytes=1 << 30)


@dataclass
class Setup:
    tmp: Path
    settings: ServeSettings
    fake: FakeVLLM
    client: TestClient
    catalog: Catalog
    backend_url: str

    def publish(self, name: str, seed: int) -> VersionRecord:
        source = make_adapter_dir(self.tmp / "src" / f"{name}-{seed}", seed=seed)
        store = open_blob_store(self.settings.registry_store)
        record, _ = publish_adapter(
            source, parse_registry_name(name), catalog=self.catalog, store=store, checks=CHECKS
        )
        return record

    def ask(self, model: str, stream: bool = False) -> httpx.Response:
        body = {"model": model, "prompt": "hi", "stream": stream}
        return self.client.post("/v1/completions", json=body)

    def served_digest(self, model: str) -> str:
        """Which version's files the backend answered from (FakeVLLM echoes the folder)."""
        response = self.ask(model)
        assert response.status_code == 200, response.text
        return Path(response.json()["choices"][0]["text"]).name


def plugin_resolvers(settings: ServeSettings) -> Callable[[str], str | None]:
    """What the loraplex plugin's two resolvers do on a replica: a registry version id is
    fetched and verified into the cache, a plain name is looked up in the adapter folder;
    any failure is None (vLLM answers 404)."""
    store = open_blob_store(settings.registry_store, settings.registry_s3_endpoint_url or None)
    cache = BlobCache(settings.registry_cache_dir, store, 1 << 30)
    local = LocalAdapterStore(settings.adapters_dir)

    def resolve(name: str) -> str | None:
        digest = digest_of_version_id(name)
        if digest is not None:
            try:
                return str(cache.ensure(digest))
            except (BlobMissing, BlobCorrupt, StoreUnavailable):
                return None
        adapter = local.get(name)
        return str(adapter.path) if adapter is not None else None

    return resolve


def make_setup(tmp_path: Path, **overrides: object) -> Iterator[Setup]:
    local = make_adapter_dir(tmp_path / "adapters" / "demo" / "alpha", seed=99)
    fields: dict = {
        "adapters_dir": local.parents[1],
        "base_model_name": "base",
        "database_url": f"sqlite:///{tmp_path}/loraplex.db",
        "registry_store": str(tmp_path / "store"),
        "registry_cache_dir": tmp_path / "cache",
    }
    settings = ServeSettings(**{**fields, **overrides})
    fake = FakeVLLM(plugin_resolvers(settings))
    with fake.serve() as url:
        app = create_app(settings, url)
        with TestClient(app) as client:
            catalog = Catalog.open(settings.resolved_database_url())
            yield Setup(tmp_path, settings, fake, client, catalog, url)


@pytest.fixture
def setup(tmp_path) -> Iterator[Setup]:
    yield from make_setup(tmp_path)


def test_name_forms_resolve_to_immutable_versions(setup: Setup):
    v1 = setup.publish("acme/bot", seed=1)
    v2 = setup.publish("acme/bot", seed=2)
    setup.catalog.set_alias(parse_registry_name("acme/bot"), "stable", 1)
    assert setup.served_digest("acme/bot") == v2.digest
    assert setup.served_digest("acme/bot@latest") == v2.digest
    assert setup.served_digest("acme/bot@stable") == v1.digest
    assert setup.served_digest("acme/bot:v1") == v1.digest
    # The backend only ever sees version ids; the client gets its own name back.
    assert set(setup.fake.registered) == {v1.version_id, v2.version_id}
    assert setup.ask("acme/bot@stable").json()["model"] == "acme/bot@stable"


def test_streamed_responses_carry_the_clients_model_name(setup: Setup):
    setup.publish("acme/bot", seed=1)
    response = setup.ask("acme/bot@latest", stream=True)
    assert response.status_code == 200
    assert '"model":"acme/bot@latest"' in response.text.replace(" ", "")
    assert "lpx-" not in response.text.split('"text"')[0]


def test_publish_and_alias_changes_serve_on_the_next_request(setup: Setup):
    v1 = setup.publish("acme/bot", seed=1)
    assert setup.served_digest("acme/bot") == v1.digest
    v2 = setup.publish("acme/bot", seed=2)
    assert setup.served_digest("acme/bot") == v2.digest  # no restart, no stale weights
    setup.catalog.rollback(parse_registry_name("acme/bot"))
    assert setup.served_digest("acme/bot") == v1.digest


def test_local_adapter_folder_still_serves(setup: Setup):
    response = setup.ask("demo/alpha")
    assert response.status_code == 200
    assert response.json()["model"] == "demo/alpha"
    assert setup.fake.registered["demo/alpha"].endswith("demo/alpha")


def test_models_lists_registry_adapters(setup: Setup):
    setup.publish("acme/bot", seed=1)
    ids = [m["id"] for m in setup.client.get("/v1/models").json()["data"]]
    assert ids == ["base", "demo/alpha", "acme/bot"]


def test_concurrent_first_requests_count_one_load(tmp_path):
    async def scenario(settings: ServeSettings, url: str) -> list[int]:
        app = create_app(settings, url)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            body = {"model": "acme/bot", "prompt": "hi"}
            responses = await asyncio.gather(
                *(client.post("/v1/completions", json=body) for _ in range(16))
            )
        return [r.status_code for r in responses]

    for setup in make_setup(tmp_path):
        record = setup.publish("acme/bot", seed=1)
        setup.fake.load_delay_s = 0.3  # keep the first load in flight while others arrive
        loads = ADAPTER_LOADS.labels(adapter="acme/bot", result="success")._value.get()
        statuses = asyncio.run(scenario(setup.settings, setup.backend_url))
        assert statuses == [200] * 16
        # The replica loads it (vLLM single-flights per name); the router counts one load.
        assert set(setup.fake.requests) == {record.version_id}
        assert ADAPTER_LOADS.labels(adapter="acme/bot", result="success")._value.get() == loads + 1


def test_the_record_of_held_adapters_is_bounded_like_the_engine_cache(tmp_path):
    # vLLM keeps max_cpu_loras adapters; beyond that the router counts a load again.
    for setup in make_setup(tmp_path, max_cpu_loras=3):
        records = [setup.publish(f"acme/a{i}", seed=i) for i in range(4)]
        successes = [
            ADAPTER_LOADS.labels(adapter=f"acme/a{i}", result="success")._value.get()
            for i in range(4)
        ]
        for _ in range(2):  # every request succeeds and gets its own adapter
            for i, record in enumerate(records):
                assert setup.served_digest(f"acme/a{i}") == record.digest
        assert setup.served_digest("acme/a3") == records[3].digest  # still held: no load
        for i in range(4):
            loads = ADAPTER_LOADS.labels(adapter=f"acme/a{i}", result="success")._value.get()
            assert loads - successes[i] == 2, i


BAD_MODELS = [
    ("dot-dot", "acme/../bot", 400),
    ("two-slashes", "acme/bot/x", 400),
    ("control-char", "acme/b\x01ot", 400),
    ("too-long", "acme/" + "b" * 200, 400),
    ("bad-alias", "acme/bot@../x", 400),
    ("bad-version", "acme/bot:vx", 400),
    ("unknown-version", "acme/bot:v9", 404),
    ("unknown-alias", "acme/bot@nope", 404),
    ("unknown-adapter", "acme/nope", 404),
    ("alias-of-local-adapter", "demo/alpha@latest", 404),
]


@pytest.mark.parametrize(
    ("model", "status"), [c[1:] for c in BAD_MODELS], ids=[c[0] for c in BAD_MODELS]
)
def test_bad_model_names(setup: Setup, model: str, status: int):
    setup.publish("acme/bot", seed=1)
    response = setup.ask(model)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == "model"
    assert not setup.fake.load_calls  # nothing reached the backend


def test_corrupted_blob_fails_that_adapter_only(setup: Setup, caplog):
    good = setup.publish("acme/good", seed=1)
    bad = setup.publish("acme/bad", seed=2)
    weights = setup.tmp / "store" / "blobs" / bad.digest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    errors_before = ADAPTER_LOADS.labels(adapter="acme/bad", result="error")._value.get()
    with caplog.at_level(logging.ERROR):
        response = setup.ask("acme/bad")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "adapter_corrupt" and "hash verification" in error["message"]
    assert any("failed hash verification" in r.getMessage() for r in caplog.records)
    assert (
        ADAPTER_LOADS.labels(adapter="acme/bad", result="error")._value.get() == errors_before + 1
    )
    assert setup.served_digest("acme/good") == good.digest


def test_store_down_is_503_for_cold_adapters_while_cached_ones_serve(tmp_path, monkeypatch):
    from tests.unit.registry_helpers import moto_s3

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto_s3() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="reg")
        # The router sees the store at an unreachable endpoint; publishing uses the live one.
        proxy_port = free_port()
        for setup in make_setup(
            tmp_path,
            registry_store="s3://reg/p",
            registry_s3_endpoint_url=f"http://127.0.0.1:{proxy_port}",
        ):
            store = open_blob_store("s3://reg/p", endpoint)
            records = []
            for name, seed in (("acme/warm", 1), ("acme/cold", 2)):
                source = make_adapter_dir(tmp_path / name, seed=seed)
                records.append(
                    publish_adapter(
                        source,
                        parse_registry_name(name),
                        catalog=setup.catalog,
                        store=store,
                        checks=CHECKS,
                    )[0]
                )
            warm, _ = records
            # Warm the cache through the real store, as if it had been up earlier.
            from loraplex.adapters.blob_cache import BlobCache

            BlobCache(setup.settings.registry_cache_dir, store, 1 << 30).ensure(warm.digest)
            assert setup.served_digest("acme/warm") == warm.digest
            response = setup.ask("acme/cold")
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "store_unavailable"
            assert setup.served_digest("acme/warm") == warm.digest
