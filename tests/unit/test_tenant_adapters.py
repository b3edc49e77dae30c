"""A tenant's adapters go with the tenant: deleting it (CLI or admin API) deletes them from
the catalog and their blobs from the store, so a tenant created later under the same name
neither lists nor serves them; publishing for a tenant that does not exist is refused,
naming it. On SQLite and PostgreSQL (the catalog rows go in the tenant's transaction)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.adapters.blob_store import open_blob_store
from loraplex.adapters.catalog import Catalog
from loraplex.adapters.content import scan_adapter_dir
from loraplex.adapters.publish import PublishChecks, publish_adapter
from loraplex.adapters.refs import parse_registry_name
from loraplex.cli import main
from loraplex.router.tenancy.store import NotFound, TenancyStore
from loraplex.router.tenancy.tenant_adapters import require_publish_tenant
from tests.unit.registry_helpers import make_adapter_dir, make_base_dir
from tests.unit.test_registry_router import Setup, make_setup

ADMIN = {"authorization": "Bearer admin-secret-123"}
CHECKS = PublishChecks(max_lora_rank=16, max_bytes=1 << 30)


def _blobs(store: Path) -> set[str]:
    folder = store / "blobs"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.fixture
def cli_env(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", database_url)
    monkeypatch.setenv("LORAPLEX_REGISTRY_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LORAPLEX_REGISTRY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAPLEX_BASE_MODEL", str(make_base_dir(tmp_path / "base")))
    return tmp_path


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _listed(capsys: pytest.CaptureFixture[str], *tenant: str) -> list[str]:
    code, out, err = _cli(capsys, "adapters", "list", "--json", *tenant)
    assert code == 0, err
    return [a["name"] for a in json.loads(out)]


def _publish(env: Path, folder: Path, name: str) -> str:
    """Publish through the registry API (the CLI's publish adds checks of its own that are
    not what these tests are about); returns the version ref."""
    record, _ = publish_adapter(
        folder,
        parse_registry_name(name),
        catalog=Catalog.open(os.environ["LORAPLEX_DATABASE_URL"]),
        store=open_blob_store(env / "store"),
        checks=CHECKS,
    )
    return record.ref


def test_cli_tenant_delete_takes_its_adapters_and_publish_needs_the_tenant(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = make_adapter_dir(cli_env / "shared", seed=1)  # acme and beta publish these bytes
    solo = make_adapter_dir(cli_env / "solo", seed=2)
    for tenant in ("acme", "beta"):
        assert _cli(capsys, "tenants", "create", tenant)[0] == 0
    for folder, name in ((shared, "acme/bot"), (solo, "acme/solo"), (shared, "beta/bot")):
        _publish(cli_env, folder, name)
    shared_digest = scan_adapter_dir(shared).digest
    solo_digest = scan_adapter_dir(solo).digest
    assert _blobs(cli_env / "store") == {shared_digest, solo_digest}

    code, _, err = _cli(capsys, "tenants", "delete", "acme")
    assert code == 0, err
    assert "its adapters acme/bot, acme/solo" in err
    assert _listed(capsys) == ["beta/bot"]
    # acme's own blob is gone; the one beta's adapter also uses stays.
    assert _blobs(cli_env / "store") == {shared_digest}

    # A new tenant under the old name starts with nothing: its first publish is v1 of its
    # own adapter, not v3 of the old one.
    assert _cli(capsys, "tenants", "create", "acme")[0] == 0
    assert _listed(capsys, "--tenant", "acme") == []
    assert _publish(cli_env, solo, "acme/bot") == "acme/bot:v1"

    # Publishing for a tenant that does not exist: refused, naming it, nothing stored.
    ghost = make_adapter_dir(cli_env / "ghost", seed=3)
    code, out, err = _cli(capsys, "adapters", "publish", str(ghost), "--name", "ghost/bot")
    assert code == 2 and out == ""
    assert "error: tenant: no tenant named 'ghost'" in err
    assert "loraplex tenants create ghost" in err
    assert scan_adapter_dir(ghost).digest not in _blobs(cli_env / "store")
    assert "ghost/bot" not in _listed(capsys)


def test_publish_needs_a_tenant_once_tenants_exist(database_url: str) -> None:
    store = TenancyStore(Catalog.open(database_url).engine)
    # No tenant at all (open loopback mode): names are plain namespaces, as before.
    require_publish_tenant(store, parse_registry_name("demo/bot"))
    store.create_tenant("acme")
    require_publish_tenant(store, parse_registry_name("acme/bot"))
    require_publish_tenant(store, parse_registry_name("public/bot"))  # shared: no tenant
    for name in ("demo/bot", "ACME/bot"):  # tenant names match exactly, as keys do
        with pytest.raises(NotFound, match=f"no tenant named '{name.split('/')[0]}'"):
            require_publish_tenant(store, parse_registry_name(name))


@pytest.fixture
def router(tmp_path: Path, database_url: str) -> Iterator[Setup]:
    yield from make_setup(tmp_path, admin_key="admin-secret-123", database_url=database_url)


def _key(setup: Setup, tenant: str) -> dict[str, str]:
    response = setup.client.post("/admin/keys", json={"tenant": tenant}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return {"authorization": f"Bearer {response.json()['key']}"}


def _models(setup: Setup, key: dict[str, str]) -> list[str]:
    return [m["id"] for m in setup.client.get("/v1/models", headers=key).json()["data"]]


def _ask(setup: Setup, model: str, key: dict[str, str]) -> tuple[int, dict]:
    body = {"model": model, "prompt": "hi"}
    response = setup.client.post("/v1/completions", json=body, headers=key)
    return response.status_code, response.json()


def test_admin_api_tenant_delete_takes_its_adapters(router: Setup) -> None:
    client = router.client
    for tenant in ("acme", "beta"):
        assert (
            client.post("/admin/tenants", json={"name": tenant}, headers=ADMIN).status_code == 201
        )
    bot = router.publish("acme/bot", seed=1)
    router.publish("beta/bot", seed=1)  # same bytes: one blob, two tenants
    solo = router.publish("acme/solo", seed=2)
    old_key = _key(router, "acme")
    assert _ask(router, "acme/bot", old_key)[0] == 200
    assert {"acme/bot", "acme/solo"} <= set(_models(router, old_key))

    response = client.delete("/admin/tenants/acme", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {"deleted": "acme", "adapters_deleted": ["acme/bot", "acme/solo"]}
    store = Path(router.settings.registry_store)
    assert _blobs(store) == {bot.digest}  # beta/bot still uses it
    assert solo.digest not in _blobs(store)
    assert _ask(router, "beta/bot", _key(router, "beta"))[0] == 200

    # The same name again: a new tenant that sees and serves none of the old adapters.
    assert client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN).status_code == 201
    new_key = _key(router, "acme")
    assert not [m for m in _models(router, new_key) if m.startswith("acme/")]
    for model in ("acme/bot", "acme/bot:v1", "acme/solo@latest"):
        status, body = _ask(router, model, new_key)
        assert status == 404 and body["error"]["code"] == "model_not_found", (model, body)
    listed = client.get("/admin/adapters", params={"tenant": "acme"}, headers=ADMIN).json()
    assert listed["data"] == []

    # Deleting a tenant that is not there: OpenAI-shaped 404 naming it.
    response = client.delete("/admin/tenants/nobody", headers=ADMIN)
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "tenant"
    assert "nobody" in response.json()["error"]["message"]


def test_catalog_delete_keeps_other_tenants_rows(database_url: str, tmp_path: Path) -> None:
    """The catalog side alone: versions, aliases, splits and rollout state of the tenant go
    (PostgreSQL enforces every foreign key), another tenant whose name starts the same
    ("acme" vs "acme2") keeps everything."""
    catalog = Catalog.open(database_url)
    store = open_blob_store(tmp_path / "store")
    for name, seed in (("acme/a", 1), ("acme/a", 2), ("acme2/a", 3)):
        folder = make_adapter_dir(tmp_path / f"{name}-{seed}", seed=seed)
        publish_adapter(
            folder, parse_registry_name(name), catalog=catalog, store=store, checks=CHECKS
        )
    catalog.set_alias(parse_registry_name("acme/a"), "stable", 1)
    # A weighted alias with a guard: split rows (which keep their versions from deletion),
    # shared rollout counters and alias events all point at the tenant's rows.
    catalog.set_alias_weights(
        parse_registry_name("acme/a"),
        "prod",
        {1: 90, 2: 10},
        guard="error_rate<=2x,min_requests=10",
    )
    assert "prod" in next(a for a in catalog.list_adapters() if a.name == "acme/a").aliases
    deleted = catalog.delete_tenant_adapters("acme")
    assert deleted.adapters == ("acme/a",) and len(deleted.unreferenced_digests) == 2
    [left] = catalog.list_adapters()
    assert (left.name, left.aliases) == ("acme2/a", {"latest": 1})
    assert catalog.delete_tenant_adapters("nobody").adapters == ()
