"""Tenants and keys in a real database (SQLite and PostgreSQL): hashing, listing, revocation,
expiry."""

from __future__ import annotations

import pytest

from loraplex.router.errors import APIError
from loraplex.router.tenancy.auth import Authenticator, Principal, may_use
from loraplex.router.tenancy.store import (
    AlreadyExists,
    KeyRejected,
    NotFound,
    TenancyError,
    TenancyStore,
    hash_key,
    parse_expiry,
)
from tests.postgres_server import Databases
from tests.unit.race_helpers import run_together
from tests.unit.tenancy_helpers import Clock, migrated_store


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(database_url: str, clock: Clock) -> TenancyStore:
    return migrated_store(database_url, clock)


def test_key_is_stored_hashed_and_listed_by_prefix_only(
    store: TenancyStore, databases: Databases
) -> None:
    store.create_tenant("acme")
    raw, info = store.create_key("acme", description="ci")
    assert raw.startswith("lpx_") and len(raw) > 40 and raw.startswith(info.prefix)
    store.engine.dispose()
    files = databases.files()
    assert files  # the database's own files (SQLite: file + WAL; PostgreSQL: tables + WAL)
    database = b"".join(p.read_bytes() for p in files)
    assert hash_key(raw).encode() in database  # the files read are the ones the key went to
    assert raw.encode() not in database
    assert [(k.prefix, k.tenant, k.description) for k in store.list_keys()] == [
        (info.prefix, "acme", "ci")
    ]
    assert store.authenticate(raw).tenant == "acme"


def test_revoked_and_expired_keys_are_rejected(store: TenancyStore, clock: Clock) -> None:
    store.create_tenant("acme")
    revoked, info = store.create_key("acme")
    expiring, _ = store.create_key("acme", expires_at=clock.now + 60)
    store.revoke_key(info.prefix)
    with pytest.raises(KeyRejected, match="revoked"):
        store.authenticate(revoked)
    assert store.authenticate(expiring).tenant == "acme"
    clock.now += 61
    with pytest.raises(KeyRejected, match="expired"):
        store.authenticate(expiring)
    with pytest.raises(KeyRejected, match="Invalid"):
        store.authenticate("lpx_unknown")
    assert [k.status(clock.now) for k in store.list_keys("acme")] == ["revoked", "expired"]
    assert store.list_tenants()[0].active_keys == 0


def test_deleting_a_tenant_deletes_its_keys(store: TenancyStore) -> None:
    store.create_tenant("acme")
    raw, _ = store.create_key("acme")
    store.set_quota("acme", requests_per_minute=5)
    store.delete_tenant("acme")
    with pytest.raises(KeyRejected):
        store.authenticate(raw)
    assert store.list_keys() == [] and store.list_quotas() == []


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (lambda s: s.create_tenant("public"), TenancyError, "tenant"),
        (lambda s: s.create_tenant("a/b"), TenancyError, "tenant"),
        (lambda s: s.create_tenant("../x"), TenancyError, "tenant"),
        (lambda s: s.create_tenant("acme"), AlreadyExists, "tenant"),
        (lambda s: s.create_key("nobody"), NotFound, "tenant"),
        (lambda s: s.revoke_key("lpx_nothing"), NotFound, "prefix"),
        (lambda s: s.set_quota("acme"), TenancyError, "requests_per_minute"),
        (lambda s: s.set_quota("acme", max_concurrent=0), TenancyError, "max_concurrent"),
        (lambda s: s.set_quota("acme", "a/../b", max_concurrent=1), TenancyError, "adapter"),
        (lambda s: s.delete_quota("acme"), NotFound, "tenant"),
    ],
)
def test_errors_name_the_field(store: TenancyStore, call, error, field) -> None:  # type: ignore[no-untyped-def]
    store.create_tenant("acme")
    with pytest.raises(error) as caught:
        call(store)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600)],
)
def test_expiry_durations(text: str, seconds: int) -> None:
    assert parse_expiry(text, 1000.0) == 1000.0 + seconds


def test_expiry_iso_times_and_errors() -> None:
    assert parse_expiry("2030-01-01T00:00:00Z", 0) == 1893456000
    assert parse_expiry("2030-01-01", 0) == 1893456000  # UTC when no zone is given
    for bad in ("soon", "2020-01-01", "0d"):
        with pytest.raises(TenancyError) as caught:
            parse_expiry(bad, 1_800_000_000)
        assert caught.value.field == "expires"


def test_open_until_the_first_tenant_then_keys_required(store: TenancyStore) -> None:
    auth = Authenticator(store, admin_key="", open_allowed=True, recheck_s=0)
    assert auth.authenticate(None).role == "anonymous"
    assert auth.authenticate("Bearer whatever-the-sdk-sends").role == "anonymous"
    store.create_tenant("acme")
    with pytest.raises(APIError) as caught:
        auth.authenticate(None)
    assert (caught.value.status, caught.value.code) == (401, "invalid_api_key")
    raw, _ = store.create_key("acme")
    assert auth.authenticate(f"Bearer {raw}") == Principal("tenant", "acme", 1, raw[:12])
    with pytest.raises(APIError):
        auth.authenticate(raw)  # not a Bearer header


def test_admin_key_setting_and_admin_keys_in_the_database(store: TenancyStore) -> None:
    auth = Authenticator(store, admin_key="s3cret-admin", open_allowed=True, recheck_s=0)
    assert auth.authenticate("Bearer s3cret-admin").role == "admin"
    with pytest.raises(APIError):
        auth.authenticate(None)  # an admin key closes open mode
    raw, _ = store.create_key(None)
    assert auth.authenticate(f"Bearer {raw}").role == "admin"


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        ("base", True),
        ("public/x", True),
        ("acme/x", True),
        ("acme/x:v2", True),
        ("globex/x", False),
        ("bare", False),
        ("acmex/y", False),
    ],
)
def test_tenant_may_use_own_and_shared_models(model: str, allowed: bool) -> None:
    assert may_use(Principal("tenant", "acme", 1), model, "base") is allowed
    assert may_use(Principal("admin"), model, "base")


def test_concurrent_writes_end_as_if_one_after_another(store: TenancyStore) -> None:
    """Routers (or admins) writing at the same moment: PostgreSQL has no single writer lock
    as SQLite does, so each write must lock what it reads."""
    outcomes = run_together(lambda i: store.create_tenant("acme"))
    assert sum(not isinstance(o, Exception) for o in outcomes) == 1
    assert all(isinstance(o, AlreadyExists) for o in outcomes if isinstance(o, Exception))
    outcomes = run_together(lambda i: store.set_quota("acme", "acme/chat", max_concurrent=i + 1))
    assert [o for o in outcomes if isinstance(o, Exception)] == []
    [quota] = store.list_quotas("acme")
    assert quota.max_concurrent in range(1, 9)
