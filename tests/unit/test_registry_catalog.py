"""The registry catalog on SQLite and PostgreSQL: versions, aliases, rollback and delete rules,
migrations, names."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from loraplex.adapters.catalog import (
    Catalog,
    CatalogConflict,
    CatalogLookupError,
    UnknownAdapter,
)
from loraplex.adapters.names import InvalidAdapterName
from loraplex.adapters.refs import AdapterRef, parse_adapter_ref, parse_registry_name
from loraplex.database import create_db_engine, dispose_shared_engines
from tests.unit.race_helpers import run_together

BOT = parse_registry_name("acme/bot")
D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64


@pytest.fixture
def catalog(database_url: str) -> Catalog:
    return Catalog.open(database_url)


def resolve(catalog: Catalog, raw: str) -> int:
    return catalog.resolve(parse_adapter_ref(raw)).number


def test_migration_from_empty_database_creates_registry_tables_and_is_idempotent(
    database_url: str,
):
    Catalog.open(database_url).add_version(BOT, D1, 10, None)
    dispose_shared_engines()  # as a restarted process: a new engine, migrated again
    again = Catalog.open(database_url)  # a second start migrates nothing and loses nothing
    assert resolve(again, "acme/bot") == 1
    engine = create_db_engine(database_url)
    inspector = sa.inspect(engine)
    assert {"registry_adapters", "registry_versions", "registry_aliases"} <= set(
        inspector.get_table_names()
    )
    with engine.connect() as conn:
        heads = {row[0] for row in conn.execute(sa.text("select version_num from alembic_version"))}
    engine.dispose()
    assert any(head.startswith("registry_") for head in heads)  # the branch's newest


def test_publish_numbers_versions_and_moves_latest(catalog: Catalog):
    v1, created1 = catalog.add_version(BOT, D1, 10, {"k": "v"})
    v2, created2 = catalog.add_version(BOT, D2, 20, None)
    assert (v1.number, v2.number, created1, created2) == (1, 2, True, True)
    assert v1.tenant == "acme" and v1.ref == "acme/bot:v1"
    assert resolve(catalog, "acme/bot") == 2
    assert resolve(catalog, "acme/bot@latest") == 2
    assert resolve(catalog, "acme/bot:v1") == 1
    assert catalog.resolve(parse_adapter_ref("acme/bot:v1")).manifest == {"k": "v"}


def test_republishing_latest_content_is_a_no_op(catalog: Catalog):
    catalog.add_version(BOT, D1, 10, None)
    record, created = catalog.add_version(BOT, D1, 10, None)
    assert (record.number, created) == (1, False)
    assert [v.number for v in catalog.list_adapters()[0].versions] == [1]


def test_aliases_and_unknown_names(catalog: Catalog):
    catalog.add_version(BOT, D1, 10, None)
    catalog.add_version(BOT, D2, 10, None)
    assert catalog.set_alias(BOT, "stable", 1) is None
    assert resolve(catalog, "acme/bot@stable") == 1
    assert catalog.set_alias(BOT, "stable", 2) == 1
    assert resolve(catalog, "acme/bot@stable") == 2
    with pytest.raises(CatalogLookupError, match="no version v9"):
        catalog.set_alias(BOT, "stable", 9)
    with pytest.raises(CatalogLookupError, match="no version v9"):
        resolve(catalog, "acme/bot:v9")
    with pytest.raises(CatalogLookupError, match="no alias @beta"):
        resolve(catalog, "acme/bot@beta")
    for unknown in ("acme/other", "acme/other:v1", "acme/other@stable"):
        with pytest.raises(UnknownAdapter):
            resolve(catalog, unknown)


def test_rollback_moves_latest_back_one_version_at_a_time(catalog: Catalog):
    for digest in (D1, D2, D3):
        catalog.add_version(BOT, digest, 10, None)
    assert catalog.rollback(BOT) == (3, 2)
    assert catalog.rollback(BOT) == (2, 1)
    with pytest.raises(CatalogConflict, match="no older version"):
        catalog.rollback(BOT)
    assert resolve(catalog, "acme/bot") == 1
    # Publishing again moves @latest to the new version, numbered after every earlier one.
    assert catalog.add_version(BOT, "4" * 64, 10, None)[0].number == 4


def test_delete_is_refused_while_aliased_unless_forced(catalog: Catalog):
    catalog.add_version(BOT, D1, 10, None)
    catalog.add_version(BOT, D2, 10, None)
    catalog.set_alias(BOT, "stable", 1)
    with pytest.raises(CatalogConflict, match="@stable"):
        catalog.delete_version(BOT, 1)
    with pytest.raises(CatalogConflict, match="@latest"):
        catalog.delete_version(BOT, 2)
    assert resolve(catalog, "acme/bot:v1") == 1  # a refused delete changed nothing

    result = catalog.delete_version(BOT, 2, force=True)
    assert result.aliases_moved == {"latest": 1}
    assert result.blob_unreferenced
    assert resolve(catalog, "acme/bot") == 1
    with pytest.raises(CatalogLookupError):
        resolve(catalog, "acme/bot:v2")
    # Numbers are never reused: v2 stays gone, the next publish is v3.
    assert catalog.add_version(BOT, D2, 10, None)[0].number == 3


def test_delete_unaliased_version_and_shared_blobs(catalog: Catalog):
    other = parse_registry_name("globex/bot")
    catalog.add_version(BOT, D1, 10, None)
    catalog.add_version(BOT, D2, 10, None)
    catalog.add_version(other, D1, 10, None)  # same bytes under another name
    result = catalog.delete_version(BOT, 1)
    assert result.aliases_moved == {}
    assert not result.blob_unreferenced  # globex/bot:v1 still uses it
    assert catalog.digest_in_use(D1)


def test_list_filters_by_tenant_and_shows_aliases(catalog: Catalog):
    catalog.add_version(BOT, D1, 10, None)
    catalog.add_version(parse_registry_name("globex/x"), D2, 10, None)
    catalog.set_alias(BOT, "stable", 1)
    everything = catalog.list_adapters()
    assert [a.name for a in everything] == ["acme/bot", "globex/x"]
    acme = catalog.list_adapters("acme")
    assert [a.name for a in acme] == ["acme/bot"]
    assert acme[0].aliases == {"latest": 1, "stable": 1}
    assert acme[0].versions[0].aliases == ("latest", "stable")


def test_catalog_survives_a_restart(database_url: str):
    first = Catalog.open(database_url)
    first.add_version(BOT, D1, 10, None)
    first.add_version(BOT, D2, 10, None)
    first.set_alias(BOT, "stable", 1)
    dispose_shared_engines()  # as a restarted process: nothing of the first engine remains
    again = Catalog.open(database_url)
    assert again.engine is not first.engine
    assert resolve(again, "acme/bot") == 2
    assert resolve(again, "acme/bot@stable") == 1
    assert again.resolve(parse_adapter_ref("acme/bot:v1")).digest == D1


REFS = [
    ("acme/bot", AdapterRef(parse_registry_name("acme/bot"))),
    ("acme/bot@stable", AdapterRef(parse_registry_name("acme/bot"), alias="stable")),
    ("acme/bot:v12", AdapterRef(parse_registry_name("acme/bot"), version=12)),
]
BAD_REFS = [
    ("acme/bot:v0", "invalid version"),
    ("acme/bot:12", "invalid version"),
    ("acme/bot:v1@x", "not both"),
    ("acme/bot@", "invalid alias"),
    ("acme/bot@../x", "invalid alias"),
    ("acme/bot@a/b", "invalid alias"),
    ("acme/../bot", "'..'"),
    ("a/b/c@x", "more than one '/'"),
    ("acme/bot@st\nable", "control characters"),
    ("acme/" + "x" * 300, "too long"),
]


@pytest.mark.parametrize(("raw", "expected"), REFS)
def test_parse_refs(raw: str, expected: AdapterRef):
    assert parse_adapter_ref(raw) == expected
    assert str(parse_adapter_ref(raw)) == raw


@pytest.mark.parametrize(("raw", "reason"), BAD_REFS)
def test_bad_refs_are_rejected_with_the_reason(raw: str, reason: str):
    with pytest.raises(InvalidAdapterName, match=reason.replace(".", r"\.")):
        parse_adapter_ref(raw)


def test_registry_names_need_a_tenant():
    with pytest.raises(InvalidAdapterName, match="no tenant"):
        parse_registry_name("bot")


def test_concurrent_publishes_and_alias_moves_all_succeed(catalog: Catalog):
    """Publishers on several machines at once: every publish gets its own number, every
    alias write lands (PostgreSQL has no single writer lock as SQLite does)."""
    catalog.add_version(BOT, D1, 10, None)
    digests = [f"{i:x}".rjust(64, "a") for i in range(8)]
    outcomes = run_together(lambda i: catalog.add_version(BOT, digests[i], 10, None))
    assert [o for o in outcomes if isinstance(o, Exception)] == []
    assert sorted(record.number for record, _ in outcomes) == list(range(2, 10))
    assert resolve(catalog, "acme/bot") == 9
    outcomes = run_together(lambda i: catalog.set_alias(BOT, "stable", i + 1))
    assert [o for o in outcomes if isinstance(o, Exception)] == []
    assert resolve(catalog, "acme/bot@stable") in range(1, 9)


def test_times_are_utc_whatever_zone_they_are_given_in(catalog: Catalog):
    """A creation time with a zone (a manifest's) is stored as the UTC moment it names, on
    either database (SQLite kept its wall-clock digits, PostgreSQL converted them)."""
    noon_in_berlin = datetime(2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    record, _ = catalog.add_version(BOT, D1, 10, None, created_at=noon_in_berlin)
    stored = catalog.resolve(parse_adapter_ref("acme/bot:v1"))
    assert stored.created_at == record.created_at == datetime(2026, 6, 1, 10, 0)
    listed = catalog.list_adapters()[0].to_json()["versions"][0]
    published = datetime.fromisoformat(listed["published_at"].replace("Z", "+00:00"))
    assert abs(published - datetime.now(timezone.utc)) < timedelta(minutes=5)
