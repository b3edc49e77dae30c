"""One database engine per process, migrated once: the router's start-up (the key check
`loraplex serve` runs first, then the app with tenancy and the registry catalog) opens the
database once, on SQLite and on PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import event

from loraplex import database
from loraplex.router.app import create_app
from loraplex.router.tenancy.guard import APIGuard
from loraplex.router.tenancy.service import check_serve_access
from loraplex.settings import ServeSettings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_start_up_builds_one_engine_and_migrates_once(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every engine that connects, however it was made; every Alembic upgrade.
    engines: set[sa.Engine] = set()
    migrations: list[str] = []
    on_connect = lambda conn: engines.add(conn.engine)  # noqa: E731
    event.listen(sa.Engine, "engine_connect", on_connect)
    upgrade = command.upgrade
    monkeypatch.setattr(
        command, "upgrade", lambda *a, **k: migrations.append(a[1]) or upgrade(*a, **k)
    )
    settings = ServeSettings(
        adapters_dir=tmp_path / "adapters",
        base_model_name="base",
        database_url=database_url,
        registry_store=str(tmp_path / "store"),
        registry_cache_dir=tmp_path / "cache",
    )
    check_serve_access(settings)  # `loraplex serve` runs it before starting vLLM
    app = create_app(settings, f"http://127.0.0.1:{_closed_port()}")
    try:
        with TestClient(app) as client:
            # Tenancy (key check) and the registry catalog (registry models) both answer.
            assert client.get("/v1/models").status_code == 200
    finally:
        event.remove(sa.Engine, "engine_connect", on_connect)
    assert migrations == ["heads"]
    guard = next(m for m in app.user_middleware if m.cls is APIGuard)
    tenancy_engine = guard.kwargs["authenticator"].store.engine
    assert engines == {tenancy_engine}
    assert database.shared_engine(database_url) is tenancy_engine
    if tenancy_engine.dialect.name == "sqlite":  # the shared engine keeps SQLite's pragmas
        with tenancy_engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_a_new_process_migrates_a_current_schema_without_change(database_url: str) -> None:
    """Restarts (a new process, a new engine) find the schema current and keep the data."""
    engine = database.shared_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO tenants (name, created_at) VALUES ('acme', 0)")
    database.dispose_shared_engines()
    again = database.shared_engine(database_url)
    assert again is not engine
    with again.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM tenants").scalars().all() == ["acme"]


def test_processes_starting_together_on_an_empty_database_all_start(database_url: str) -> None:
    """Router replicas (or workers) started at once: one migrates, the others wait for it."""
    code = "import sys; from loraplex.database import shared_engine; shared_engine(sys.argv[1])"
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", code, database_url], stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in starts]
    assert [p.returncode for p in starts] == [0, 0, 0], errors
    with database.shared_engine(database_url).connect() as conn:
        heads = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
    newest = ScriptDirectory.from_config(database.alembic_config(database_url)).get_heads()
    assert sorted(heads) == sorted(newest)
