"""The registry's lifecycle, as a user meets it: a corrupted blob is repaired by publishing
the same folder again (folder store and S3), and an adapter's last deleted version takes
the entry with it, so a local folder of that name is served (and listed once) again,
while version numbers keep counting. On SQLite and PostgreSQL (tests/unit/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from fastapi.testclient import TestClient

from loraplex.adapters.blob_cache import BlobCache
from loraplex.adapters.blob_store import LocalBlobStore, open_blob_store
from loraplex.adapters.catalog import Catalog, CatalogConflict, CatalogLookupError
from loraplex.adapters.content import BlobCorrupt
from loraplex.adapters.local_store import LocalAdapterStore
from loraplex.adapters.publish import PublishChecks, publish
from loraplex.adapters.refs import parse_adapter_ref, parse_registry_name
from loraplex.adapters.registry import Registry
from loraplex.router.adapter_loading import AdapterResolver
from loraplex.router.app import create_app
from loraplex.settings import ServeSettings
from tests.unit.registry_helpers import free_port, make_adapter_dir, moto_s3
from tests.unit.test_registry_cli import run
from tests.unit.test_registry_router import Setup, make_setup

CHECKS = PublishChecks(max_lora_rank=16, max_bytes=1 << 30)
NAME = parse_registry_name("demo/alpha")


def corrupt(store, digest: str) -> None:
    """Flip the last byte of the stored weights (the way a bad disk or a bad copy would)."""
    name = "adapter_model.safetensors"
    if isinstance(store, LocalBlobStore):
        path = store.root / "blobs" / digest / name
        path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 0xFF]))
        return
    client = boto3.client("s3", endpoint_url=store.endpoint_url)
    key = store._key(digest, name)
    body = client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=store.bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 0xFF]))


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "folder":
        yield LocalBlobStore(tmp_path / "store")
        return
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto_s3() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="adapters")
        yield open_blob_store("s3://adapters/reg", endpoint)


def test_republishing_repairs_a_corrupted_blob(store, tmp_path):
    catalog = Catalog.open(f"sqlite:///{tmp_path}/db.sqlite")
    source = make_adapter_dir(tmp_path / "src", seed=1)
    first = publish(source, NAME, catalog=catalog, store=store, checks=CHECKS)
    corrupt(store, first.record.digest)
    cache = BlobCache(tmp_path / "cache", store, 1 << 30)
    with pytest.raises(BlobCorrupt, match="republish the adapter"):
        cache.ensure(first.record.digest)

    lines: list[str] = []
    again = publish(
        source, NAME, catalog=catalog, store=store, checks=CHECKS, progress=lines.append
    )
    assert (again.created, again.repaired, again.record.number) == (False, True, 1)
    assert any("fails verification" in line and "replacing it" in line for line in lines)
    folder = cache.ensure(first.record.digest)  # the version serves again, no new version
    assert (folder / "adapter_model.safetensors").read_bytes() == (
        source / "adapter_model.safetensors"
    ).read_bytes()

    # The same bytes under another name: the blob is checked, not blindly reused.
    corrupt(store, first.record.digest)
    other = publish(
        source, parse_registry_name("demo/copy"), catalog=catalog, store=store, checks=CHECKS
    )
    assert other.created and other.repaired
    cache2 = BlobCache(tmp_path / "cache2", store, 1 << 30)
    assert cache2.ensure(first.record.digest).is_dir()
    # An intact blob is verified and kept.
    assert not publish(source, NAME, catalog=catalog, store=store, checks=CHECKS).repaired


@pytest.fixture
def router(tmp_path) -> Iterator[Setup]:
    """The router in front of a stand-in engine with the plugin's resolvers."""
    yield from make_setup(tmp_path)


def test_a_corrupt_version_serves_again_once_republished(router: Setup):
    """Before: 500 adapter_corrupt, and republishing answered "unchanged" and kept it."""
    bad = router.publish("acme/bot", seed=2)
    corrupt(LocalBlobStore(router.tmp / "store"), bad.digest)
    response = router.ask("acme/bot")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "adapter_corrupt"
    again = router.publish("acme/bot", seed=2)  # the same folder again
    assert again.number == 1
    assert router.served_digest("acme/bot") == bad.digest  # the next request serves


def test_cli_repair_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", f"sqlite:///{tmp_path}/loraplex.db")
    monkeypatch.setenv("LORAPLEX_REGISTRY_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LORAPLEX_REGISTRY_CACHE_DIR", str(tmp_path / "cache"))
    source = make_adapter_dir(tmp_path / "src", seed=1)
    code, out, err = run(capsys, "publish", str(source), "--name", "demo/alpha", "--force")
    assert code == 0, err
    digest = out.splitlines()[0].split("lpx-")[1]
    corrupt(LocalBlobStore(tmp_path / "store"), digest)
    code, out, err = run(capsys, "publish", str(source), "--name", "demo/alpha")
    assert code == 0, err
    assert out.strip() == (
        "repaired: demo/alpha:v1 (@latest) already has this content; its blob failed "
        "verification in the store and was replaced"
    )


def test_deleting_the_last_version_removes_the_entry_numbers_continue(database_url, tmp_path):
    registry = Registry(
        Catalog.open(database_url),
        LocalBlobStore(tmp_path / "store"),
        BlobCache(tmp_path / "cache", LocalBlobStore(tmp_path / "store"), 1 << 30),
    )
    catalog = registry.catalog
    for seed in (1, 2):
        publish(
            make_adapter_dir(tmp_path / f"v{seed}", seed=seed),
            NAME,
            catalog=catalog,
            store=registry.store,
            checks=CHECKS,
        )
    catalog.set_alias(NAME, "stable", 1)
    assert not registry.delete_version(NAME, 2, force=True).adapter_removed
    deleted = registry.delete_version(NAME, 1, force=True)
    assert deleted.adapter_removed and deleted.aliases_moved == {"latest": None, "stable": None}
    assert not catalog.exists(NAME)
    assert [a.name for a in catalog.list_adapters()] == []

    # Publishing the name again continues the numbering: :v1 and :v2 meant other weights.
    again = publish(
        make_adapter_dir(tmp_path / "v3", seed=3),
        NAME,
        catalog=catalog,
        store=registry.store,
        checks=CHECKS,
    )
    assert again.record.ref == "demo/alpha:v3"
    with pytest.raises(CatalogLookupError, match="no version v1"):
        catalog.resolve(parse_adapter_ref("demo/alpha:v1"))

    # `adapters delete tenant/name` removes an entry left empty (older loraplex), and refuses
    # one that still has versions, naming them.
    with pytest.raises(CatalogConflict, match=r"still has versions v3"):
        registry.delete_adapter(NAME)
    empty = parse_registry_name("demo/empty")
    record, _ = catalog.add_version(empty, "0" * 64, 1, None)
    catalog.delete_version(empty, record.number, force=True)  # the catalog alone keeps it
    assert catalog.exists(empty)
    registry.delete_adapter(empty)
    assert not catalog.exists(empty)


def test_the_folder_adapter_is_served_again_and_listed_once(tmp_path):
    adapters_dir = tmp_path / "adapters"
    make_adapter_dir(adapters_dir / "demo" / "alpha", seed=7)
    settings = ServeSettings(
        adapters_dir=adapters_dir,
        base_model_name="base",
        database_url=f"sqlite:///{tmp_path}/db.sqlite",
        registry_store=str(tmp_path / "store"),
        registry_cache_dir=tmp_path / "cache",
    )
    resolver = AdapterResolver.from_settings(settings, LocalAdapterStore(adapters_dir))
    registry = resolver.registry
    assert registry is not None
    record = publish(
        make_adapter_dir(tmp_path / "src", seed=1),
        NAME,
        catalog=registry.catalog,
        store=registry.store,
        checks=CHECKS,
    ).record
    served = resolver.resolve("demo/alpha")
    assert served is not None and served.id == record.version_id  # the registry shadows
    app = create_app(settings, f"http://127.0.0.1:{free_port()}")
    with TestClient(app) as client:
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert listed.count("demo/alpha") == 1

        registry.delete_version(NAME, 1, force=True)
        served = resolver.resolve("demo/alpha")
        assert served is not None and served.path == (adapters_dir / "demo" / "alpha").resolve()
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert listed.count("demo/alpha") == 1
