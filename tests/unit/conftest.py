"""Fixtures shared by the unit tests: the database kinds the shared state must work on.

`databases` is parametrized over SQLite (a file in the test's folder) and PostgreSQL
(one throwaway server per session, tests/postgres_server.py; a new schema per test,
dropped after it). A test that asks for `database_url` runs once on each; `-m postgres`
selects the PostgreSQL runs, `-m "not postgres"` leaves them out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.database import dispose_shared_engines
from tests.postgres_server import Databases, PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | PostgresUnavailable]:
    """The session's PostgreSQL server, or why there is none (each test then fails)."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        yield exc
        return
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    server = None
    if request.param == "postgresql":
        # Looked up here, not as a parameter: a SQLite-only run starts no server.
        postgres_server = request.getfixturevalue("postgres_server")
        if isinstance(postgres_server, PostgresUnavailable):
            pytest.fail(str(postgres_server), pytrace=False)
        assert isinstance(postgres_server, PostgresServer)
        server = postgres_server
    dbs = Databases(request.param, tmp_path, server)
    yield dbs
    dispose_shared_engines()
    dbs.drop()


@pytest.fixture
def database_url(databases: Databases) -> str:
    """A fresh database (SQLite, then PostgreSQL)."""
    return databases.new()


@pytest.fixture(autouse=True)
def _no_shared_engine_outlives_its_test() -> Iterator[None]:
    """Engines shared within a process (`shared_engine`) point at a test's own database."""
    yield
    dispose_shared_engines()
