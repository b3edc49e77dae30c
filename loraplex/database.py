"""One SQLAlchemy database for loraplex's state (registry catalog, tenants, keys, quotas).

SQLite file by default (one machine, one or more router workers), any SQLAlchemy
URL (PostgreSQL) when several router replicas share it. The schema is owned by
Alembic migrations in `loraplex/migrations`: each component (registry, tenancy)
is an independent branch there, so `migrate()` upgrades all of them to `heads`.

A process holds one engine (one connection pool) per database and migrates it once:
`shared_engine` is what the router's components (tenancy, registry catalog) open.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from loraplex.settings import default_cache_dir

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Connections one engine may hold: as many as the threads that run database calls at once
# (anyio's default thread pool, 40), so a burst of requests never waits on the pool.
_POOL_SIZE = 10
_MAX_OVERFLOW = 30

# Any constant shared by every loraplex process (PostgreSQL advisory locks are numbers).
_MIGRATION_LOCK = 0x6C6F7261706C6578  # "loraplex"

_shared: dict[str, Engine] = {}
_shared_lock = threading.Lock()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean the PostgreSQL driver loraplex ships (psycopg 3);
    SQLAlchemy alone would look for psycopg2, which is not installed."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


class DatabaseURLError(ValueError):
    """`database_url` names no database loraplex can open (not a URL, no driver for it, a
    SQLite file whose folder is missing or is a file). The message names the setting and
    the URL (password hidden); the CLI exits 3 with it, like an unreachable database."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"database_url {_shown(url)}: {problem}")


def _shown(url: str) -> str:
    try:
        return repr(make_url(url).render_as_string(hide_password=True))
    except ArgumentError:
        return repr(url)


def create_db_engine(url: str) -> Engine:
    """A new engine with the settings concurrent router workers need (most callers want
    `shared_engine`). Raises DatabaseURLError for a URL that cannot name a database."""
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseURLError(
            url, "not a database URL (sqlite:////path/to/file.db or postgresql://user@host/db)"
        ) from None
    pool = {"pool_size": _POOL_SIZE, "max_overflow": _MAX_OVERFLOW}
    try:
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database
            if database and database != ":memory:":
                _check_sqlite_folder(url, Path(database).parent)
            else:
                pool = {}  # in memory: SQLAlchemy's single-connection pool, no queue to size
            # Several workers write the same file: wait for a lock instead of failing.
            engine = create_engine(url, connect_args={"timeout": 30}, **pool)
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_pre_ping=True, **pool)
    except NoSuchModuleError:
        raise DatabaseURLError(
            url, f"no SQLAlchemy dialect '{parsed.drivername}' (use sqlite or postgresql)"
        ) from None
    except ImportError as exc:  # the dialect is known, its driver package is not installed
        raise DatabaseURLError(
            url,
            f"the database driver '{exc.name}' is not installed; plain postgresql:// uses "
            "psycopg (installed with loraplex)",
        ) from None


def _check_sqlite_folder(url: str, folder: Path) -> None:
    """The folder of a SQLite file must exist: a typo in a given URL would otherwise make
    a new, empty database in a new folder (and serve no adapters, silently). Only loraplex's
    own default folder (the cache) is created."""
    folder = folder.expanduser()
    if folder.is_dir():
        return
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise DatabaseURLError(url, f"{blocker} is a file, not a folder")
    if folder.resolve() == default_cache_dir().resolve():
        folder.mkdir(parents=True, exist_ok=True)
        return
    raise DatabaseURLError(url, f"the folder {folder} does not exist (create it first)")


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    # WAL lets readers run while a writer commits; foreign keys are off by default.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema of every component to its newest revision (idempotent)."""
    log.debug("migrating %s", engine.url.render_as_string(hide_password=True))
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        _take_migration_lock(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, "heads")


def _take_migration_lock(connection: Connection) -> None:
    """Processes starting together on an empty database (router replicas, workers): one
    migrates, the others wait here until it commits, then find the schema current.
    Without it, 6 of 12 processes started three at a time on empty databases failed with
    "table already exists" (measured, on PostgreSQL and on SQLite alike)."""
    if connection.dialect.name == "postgresql":
        # Held until this transaction ends.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    elif connection.dialect.name == "sqlite":
        # The write lock now, not at the first write. It also makes the migration one
        # transaction: Python's sqlite3 driver would run each CREATE TABLE on its own.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def shared_engine(url: str) -> Engine:
    """This process's engine for the database at `url`, created and migrated on first use.

    The router's tenancy and registry catalog share it: one connection pool per process
    (not one per component), and the migrations run once at start-up, not once per
    component. `dispose_shared_engines` closes them (tests, between databases).
    """
    key = normalize_url(url)
    with _shared_lock:
        engine = _shared.get(key)
        if engine is None:
            engine = create_db_engine(key)
            migrate(engine)
            _shared[key] = engine
        return engine


def dispose_shared_engines() -> None:
    """Close every shared engine's connections and forget them: the next `shared_engine`
    call builds (and migrates) a new one."""
    with _shared_lock:
        engines = list(_shared.values())
        _shared.clear()
    for engine in engines:
        engine.dispose()
