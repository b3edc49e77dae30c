"""The router's catalog-answer cache (router/catalog_cache.py) on real SQLite files: a
change committed by another process or by the router's own pool is seen on the very next
lookup, a missing or replaced file answers what the uncached lookup answers (an outage:
503, never a cached answer), and PostgreSQL is asked on every request."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from loraplex import database
from loraplex.adapters.catalog import Catalog
from loraplex.adapters.local_store import LocalAdapterStore
from loraplex.adapters.refs import parse_adapter_ref, parse_registry_name
from loraplex.adapters.registry import Registry
from loraplex.router.adapter_loading import AdapterResolver
from loraplex.router.catalog_cache import CachedCatalog
from loraplex.router.errors import APIError

SUPPORT = parse_registry_name("acme/support")
D = [str(i) * 64 for i in range(1, 7)]


def resolver_on(catalog: Catalog) -> AdapterResolver:
    registry = Registry(catalog, store=None, cache=None)  # type: ignore[arg-type]
    return AdapterResolver(LocalAdapterStore(Path("/nonexistent")), "base", registry)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "loraplex.db"


@pytest.fixture
def catalog(db_path: Path) -> Catalog:
    catalog = Catalog.open(database.sqlite_url(db_path))
    for digest in D[:3]:  # v1..v3, @latest on v3
        catalog.add_version(SUPPORT, digest, 10, None)
    catalog.set_alias(SUPPORT, "prod", 1)
    return catalog


@pytest.fixture
def resolver(catalog: Catalog) -> Iterator[AdapterResolver]:
    resolver = resolver_on(catalog)
    yield resolver
    resolver.close()


@contextmanager
def counted_queries(engine: sa.Engine) -> Iterator[list[str]]:
    """The statements `engine` runs inside the block."""
    statements: list[str] = []

    def record(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def versions(resolver: AdapterResolver, *models: str) -> list[int | None]:
    answers = [resolver.resolve(model) for model in models]
    return [a.version if a is not None else None for a in answers]


def in_another_process(db_path: Path, script: str) -> None:
    """Runs `script` (with `catalog` and `SUPPORT` defined) in a new Python process on the
    same SQLite file, through the project's own catalog API."""
    prelude = (
        "from loraplex import database\n"
        "from loraplex.adapters.catalog import Catalog\n"
        "from loraplex.adapters.refs import parse_registry_name\n"
        f"catalog = Catalog.open(database.sqlite_url({str(db_path)!r}))\n"
        "SUPPORT = parse_registry_name('acme/support')\n"
    )
    subprocess.run([sys.executable, "-c", prelude + script], check=True, timeout=120)


def test_unchanged_answers_are_reused(catalog: Catalog, resolver: AdapterResolver) -> None:
    """Otherwise the rest of this module proves nothing."""
    assert versions(resolver, "acme/support", "acme/support@prod") == [3, 1]
    with counted_queries(catalog.engine) as statements:
        assert versions(resolver, "acme/support", "acme/support@prod") == [3, 1]
    assert statements == []


def test_a_publish_and_an_alias_move_by_another_process_apply_to_the_next_lookup(
    catalog: Catalog, resolver: AdapterResolver, db_path: Path
) -> None:
    models = ("acme/support", "acme/support@prod", "acme/support:v4", "acme/newbot")
    with pytest.raises(APIError) as missing:  # cached as "not in the registry" too
        versions(resolver, "acme/support:v4")
    assert missing.value.status == 404
    with pytest.raises(APIError):
        versions(resolver, "acme/newbot")
    assert versions(resolver, *models[:2]) == [3, 1]

    in_another_process(
        db_path,
        f"catalog.add_version(SUPPORT, {D[3]!r}, 10, None)\n"
        "catalog.set_alias(SUPPORT, 'prod', 2)\n"
        f"catalog.add_version(parse_registry_name('acme/newbot'), {D[4]!r}, 10, None)\n",
    )
    assert versions(resolver, *models) == [4, 2, 4, 1]

    in_another_process(db_path, "catalog.rollback(SUPPORT)\n")
    assert versions(resolver, "acme/support") == [3]


def test_changes_through_the_routers_own_pool_apply_to_the_next_lookup(
    catalog: Catalog, resolver: AdapterResolver
) -> None:
    assert versions(resolver, "acme/support", "acme/support@prod") == [3, 1]
    own = resolver.registry.catalog  # type: ignore[union-attr]
    assert own.engine is database.shared_engine(database.sqlite_url(Path(own.engine.url.database)))

    own.set_alias(SUPPORT, "prod", 3)
    assert versions(resolver, "acme/support@prod") == [3]
    own.set_alias_weights(SUPPORT, "prod", {2: 90, 3: 10})
    target = resolver.resolve("acme/support@prod", "user-1")
    assert target is not None and target.version in (2, 3) and target.role != "single"
    own.rollback(SUPPORT)
    assert versions(resolver, "acme/support") == [2]
    own.add_version(SUPPORT, D[5], 10, None)
    assert versions(resolver, "acme/support", "acme/support:v4") == [4, 4]


def _break(db_path: Path) -> None:
    """An outage as tests/unit/test_database_outage.py makes one: the file (and its -wal,
    -shm) gone, a folder in its place, the pool's open handles dropped."""
    for file in db_path.parent.glob(db_path.name + "*"):
        file.unlink()
    db_path.mkdir()
    database.shared_engine(database.sqlite_url(db_path)).dispose()


def test_a_database_outage_answers_503_not_a_cached_answer(
    catalog: Catalog, resolver: AdapterResolver, db_path: Path, tmp_path: Path
) -> None:
    assert versions(resolver, "acme/support", "acme/support@prod") == [3, 1]
    backup = tmp_path / "backup.db"
    with sqlite3.connect(db_path) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    catalog.set_alias(SUPPORT, "prod", 2)  # a change the backup does not have
    assert versions(resolver, "acme/support@prod") == [2]
    _break(db_path)
    with pytest.raises(sa.exc.SQLAlchemyError):  # what the uncached lookup meets
        catalog.resolve_target(parse_adapter_ref("acme/support"))
    for model in ("acme/support", "acme/support@prod"):
        with pytest.raises(APIError) as outage:
            resolver.resolve(model)
        assert (outage.value.status, outage.value.code) == (503, "database_unavailable")

    db_path.rmdir()  # the backup restored: answers again (its own), no restart
    shutil.move(backup, db_path)
    assert versions(resolver, "acme/support", "acme/support@prod") == [3, 1]


def test_a_deleted_file_is_asked_again_like_the_uncached_lookup(
    catalog: Catalog, resolver: AdapterResolver, db_path: Path
) -> None:
    """Deleted under a running router (nothing in its place): whatever the catalog itself
    answers now, the cache answers too."""
    assert versions(resolver, "acme/support") == [3]
    for file in db_path.parent.glob(db_path.name + "*"):
        file.unlink()
    database.shared_engine(database.sqlite_url(db_path)).dispose()
    ref = parse_adapter_ref("acme/support")
    try:
        uncached: object = catalog.resolve_target(ref).incumbent.number
    except sa.exc.SQLAlchemyError:
        uncached = 503
    try:
        cached: object = versions(resolver, "acme/support")[0]
    except APIError as exc:
        cached = exc.status
    assert cached == uncached
    assert cached != 3  # a new, empty file or none at all: never the old answer


def test_a_replaced_file_answers_from_the_new_file(
    catalog: Catalog, resolver: AdapterResolver, db_path: Path, tmp_path: Path
) -> None:
    """A backup restored over the live file (a new inode; its data_version may equal the
    old file's)."""
    backup = tmp_path / "backup.db"
    with sqlite3.connect(db_path) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    catalog.add_version(SUPPORT, D[3], 10, None)
    catalog.set_alias(SUPPORT, "prod", 4)
    assert versions(resolver, "acme/support", "acme/support@prod") == [4, 4]

    for file in db_path.parent.glob(db_path.name + "-*"):
        file.unlink()
    shutil.move(backup, db_path)
    database.shared_engine(database.sqlite_url(db_path)).dispose()
    uncached = [
        catalog.resolve_target(parse_adapter_ref(m)).incumbent.number
        for m in ("acme/support", "acme/support@prod")
    ]
    assert uncached == [3, 1]
    assert versions(resolver, "acme/support", "acme/support@prod") == uncached


NOT_CACHED_URLS = [
    "postgresql+psycopg://loraplex@127.0.0.1:1/loraplex",
    "postgresql://loraplex:secret@db.example/loraplex",
    "sqlite://",
    "sqlite:///:memory:",
    "sqlite:///file:shared?mode=memory&uri=true",
]


@pytest.mark.parametrize("url", NOT_CACHED_URLS)
def test_only_a_sqlite_file_is_cached(url: str) -> None:
    """By construction: no counter to watch, so no cache (creating an engine connects to
    nothing)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        assert CachedCatalog.for_catalog(Catalog(engine)) is None
    finally:
        engine.dispose()


def test_postgresql_is_asked_on_every_lookup(database_url: str) -> None:
    """On both kinds of database: SQLite asks once, PostgreSQL every time."""
    catalog = Catalog.open(database_url)
    catalog.add_version(SUPPORT, D[0], 10, None)
    resolver = resolver_on(catalog)
    try:
        with counted_queries(catalog.engine) as statements:
            assert versions(resolver, *["acme/support"] * 3) == [1, 1, 1]
        expected = 1 if catalog.engine.url.get_backend_name() == "sqlite" else 3
        assert len(statements) == expected
    finally:
        resolver.close()
