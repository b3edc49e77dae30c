"""One schema source: the SQLAlchemy tables the code queries equal what the Alembic
migrations create, on SQLite and on PostgreSQL. Alembic's autogenerate comparison (the one
`alembic revision --autogenerate` runs) reads the migrated database back and lists every
difference: a column, a NULL rule, a server default, an index, a unique constraint, a
foreign key and its ON DELETE. A table changed without a migration (or the other way
round) fails here, naming the table and what differs.

And one engine per process, closed at shutdown: after the router's lifespan ends, the
database holds no connection of it.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient

from loraplex import database
from loraplex.adapters import catalog
from loraplex.router.app import create_app
from loraplex.router.tenancy import store
from loraplex.settings import ServeSettings

# Every component's tables (one Alembic branch each: registry, tenancy).
COMPONENT_METADATA = (catalog.metadata, store.metadata)


def all_tables() -> sa.MetaData:
    merged = sa.MetaData()
    for metadata in COMPONENT_METADATA:
        for table in metadata.tables.values():
            table.to_metadata(merged)
    return merged


def _same_empty_string_default(
    _context: MigrationContext,
    _inspected_column: sa.Column,
    _metadata_column: sa.Column,
    inspected_default: str | None,
    _metadata_default: object,
    rendered_metadata_default: str | None,
) -> bool | None:
    """`server_default=""` reads back from SQLite as `''`, which Alembic's SQLite comparison
    (it unquotes only non-empty strings) reports as a change; None: Alembic decides."""
    if rendered_metadata_default == "" and inspected_default in ("''", "('')"):
        return False
    return None


def schema_differences(engine: sa.Engine, metadata: sa.MetaData) -> list:
    """What `alembic revision --autogenerate` would write to bring the database to
    `metadata` (empty: they agree)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "compare_server_default": _same_empty_string_default},
        )
        return compare_metadata(context, metadata)


def _describe_one(diff: tuple) -> str:
    kind, subject = diff[0], diff[1]
    if kind.endswith("_table"):
        return f"{kind} {subject.name}"
    if kind.endswith("_column"):
        return f"{kind} {diff[2]}.{diff[3].name}"
    if kind.startswith("modify_"):  # (kind, schema, table, column, existing, old, new)
        return f"{kind} {diff[2]}.{diff[3]}: database {diff[5]!r}, table {diff[6]!r}"
    if kind.endswith("_fk"):
        columns = ", ".join(c.name for c in subject.columns)
        return (
            f"{kind} {subject.table.name}({columns}) -> {subject.referred_table.name} "
            f"ON DELETE {subject.ondelete}"
        )
    columns = ", ".join(c.name for c in subject.columns)
    return f"{kind} {type(subject).__name__} {subject.name} on {subject.table.name}({columns})"


def describe(differences: list) -> str:
    """One line per difference, in the words of Alembic's operations (`remove_index`: the
    database has an index the table lacks; `add_fk`: the table has a foreign key the
    database lacks)."""
    # Alembic nests the column-level changes of one table in a list.
    flat = [d for entry in differences for d in (entry if isinstance(entry, list) else [entry])]
    return "\n".join(f"  {_describe_one(d)}" for d in flat)


def test_tables_equal_what_the_migrations_create(database_url: str) -> None:
    engine = database.create_db_engine(database_url)
    try:
        database.migrate(engine)
        differences = schema_differences(engine, all_tables())
    finally:
        engine.dispose()
    assert not differences, (
        "the SQLAlchemy tables and the migrated database differ (change the table, or add a "
        f"migration):\n{describe(differences)}"
    )


def _without(metadata: sa.MetaData, table: str, constraint: type) -> sa.MetaData:
    copy = sa.MetaData()
    for t in metadata.tables.values():
        t.to_metadata(copy)
    target = copy.tables[table]
    target.constraints = {c for c in target.constraints if not isinstance(c, constraint)}
    for column in target.columns:  # a foreign key is known to its column too
        if constraint is sa.ForeignKeyConstraint:
            column.foreign_keys.clear()
    return copy


@pytest.mark.parametrize(
    ("table", "constraint", "expected"),
    [
        (
            "quotas",
            sa.UniqueConstraint,
            "remove_constraint UniqueConstraint uq_quotas_tenant_adapter",
        ),
        ("registry_versions", sa.ForeignKeyConstraint, "remove_fk registry_versions(adapter_id)"),
    ],
)
def test_a_table_that_lost_a_constraint_is_caught(
    database_url: str, table: str, constraint: type, expected: str
) -> None:
    """The comparison is not blind: a table without the constraint its migration made is
    reported (compared with the tables as they are, whatever else differs)."""
    engine = database.create_db_engine(database_url)
    try:
        database.migrate(engine)
        before = describe(schema_differences(engine, all_tables())).splitlines()
        after = describe(
            schema_differences(engine, _without(all_tables(), table, constraint))
        ).splitlines()
    finally:
        engine.dispose()
    new = [line.strip() for line in after if line not in before]
    assert len(new) == 1 and new[0].startswith(expected), new


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_router_leaves_no_database_connection_open_at_shutdown(
    database_url: str, tmp_path: Path
) -> None:
    settings = ServeSettings(
        adapters_dir=tmp_path / "adapters",
        base_model_name="base",
        database_url=database_url,
        registry_store=str(tmp_path / "store"),
        registry_cache_dir=tmp_path / "cache",
    )
    app = create_app(settings, f"http://127.0.0.1:{_closed_port()}")
    engine = database.shared_engine(database_url)
    with TestClient(app) as client:
        # Tenancy (key lookup) and the registry catalog (its models) both use the database.
        assert client.get("/v1/models").status_code == 200
        assert engine.pool.checkedin() >= 1  # pooled while serving
    assert engine.pool.checkedin() == 0 and engine.pool.checkedout() == 0
    if engine.dialect.name == "postgresql":
        # The schema's connections are marked with its name (tests/postgres_server.py).
        name = database_url.split("application_name=", 1)[1].split("&", 1)[0]
        admin = database.create_db_engine(database_url.split("?", 1)[0])
        try:
            with admin.connect() as conn:
                open_connections = conn.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                    {"n": name},
                ).scalar()
        finally:
            admin.dispose()
        assert open_connections == 0
