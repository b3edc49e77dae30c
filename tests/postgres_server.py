"""A throwaway PostgreSQL server on loopback for the shared-state tests, and the fresh
databases (SQLite or PostgreSQL) one test gets.

Debian's server binaries (`initdb`, `pg_ctl` under /usr/lib/postgresql/<version>/bin,
installed by `make services`) make a cluster in a temporary folder: TCP on 127.0.0.1 at
a free port, the unix socket in that folder, no password (trust, loopback only). initdb
refuses to run as root, and CI runs as root: there the server runs as the `postgres`
system user, which then owns the folder. Durability is switched off (fsync, synchronous
commit, full-page writes): the data is thrown away, so nothing waits on the disk.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

BIN_GLOB = "/usr/lib/postgresql/*/bin"
# Tests connect as the superuser: they create and drop databases and schemas, and end
# connections a test left open.
SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Path:
    """The newest installed server's bin folder."""
    candidates = sorted(
        (p.parent for p in Path("/").glob(BIN_GLOB.lstrip("/") + "/initdb")),
        key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()],
    )
    if not candidates:
        raise PostgresUnavailable(
            f"PostgreSQL server binaries (initdb, pg_ctl in {BIN_GLOB}) are not installed: "
            "run `make services` (Debian's postgresql package; CI installs it)"
        )
    return candidates[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One cluster in a temporary folder: `start`, then `create_schema` per test (or
    `create_database` for a test that needs a database of its own), `stop`."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._test_database = ""
        # Root may not run initdb; an ordinary user runs the server itself.
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", SUPERUSER, "--"]
            owner = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    @property
    def version(self) -> str:
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--version"], capture_output=True, text=True
        )
        return out.stdout.split()[-1]

    def _run(self, *args: str) -> None:
        command = [*self._as_user, str(self.bindir / args[0]), *args[1:]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{log}"
            )

    def start(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
                # Not UTC, as a production server may not be: a time stored with the
                # session's zone instead of UTC shows up as a 5.5-hour error.
                "-c timezone=Asia/Kolkata",
            ]
        )
        # A free port can be taken between the probe and the bind: try another.
        for _attempt in range(5):
            self.port = _free_port()
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    f"{options} -p {self.port}",
                    "-w",
                    "-t",
                    "60",
                    "start",
                )
                return
            except RuntimeError:
                if "could not bind" not in (self.log.read_text() if self.log.exists() else ""):
                    raise
        raise RuntimeError(f"PostgreSQL found no free port:\n{self.log.read_text()}")

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3, the driver loraplex ships) for `database`."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str, *params: object, database: str = "postgres") -> None:
        dsn = f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql, params or None)

    def create_schema(self) -> str:
        """A URL whose connections see only a new, empty schema of the shared test database
        (its search_path). A schema is made in milliseconds where a database takes 0.2-0.5 s
        (measured here), and most tests need one."""
        if not self._test_database:
            self._test_database = self.create_database()
        name = f"s_{uuid.uuid4().hex[:16]}"
        self._admin(f'CREATE SCHEMA "{name}"', database=self._test_database)
        # The application name marks the schema's connections, for `drop_schema`.
        return (
            f"{self.url(self._test_database)}?application_name={name}"
            f"&options=-csearch_path%3D{name}"
        )

    def drop_schema(self, url: str) -> None:
        """Drop the schema of a `create_schema` URL, ending connections a test left open."""
        name = url.split("application_name=", 1)[1].split("&", 1)[0]
        self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            name,
        )
        self._admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE', database=self._test_database)

    def create_database(self) -> str:
        """A new, empty database; returns its name."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def database_files(self, name: str = "") -> list[Path]:
        """The files a database's rows and their write-ahead log live in (after a checkpoint);
        by default the database `create_schema` makes its schemas in."""
        name = name or self._test_database
        self._admin("CHECKPOINT")
        dsn = f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
        assert row is not None, name
        folders = [self.data / "base" / str(row[0]), self.data / "pg_wal"]
        return [p for folder in folders for p in folder.iterdir() if p.is_file()]

    def stop(self) -> None:
        """Stop the server (fast shutdown: ends open sessions) and delete the cluster."""
        try:
            if self.port and (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class Databases:
    """Fresh, empty databases of one kind for one test (on PostgreSQL: a schema each)."""

    def __init__(self, kind: str, folder: Path, server: PostgresServer | None) -> None:
        self.kind = kind
        self.folder = folder
        self.server = server
        self._created: list[str] = []

    def new(self) -> str:
        """The URL of a new, empty database."""
        if self.server is None:
            path = self.folder / (
                "loraplex.db" if not self._created else f"db{len(self._created)}.db"
            )
            self._created.append(str(path))
            return f"sqlite:///{path}"
        url = self.server.create_schema()
        self._created.append(url)
        return url

    def files(self) -> list[Path]:
        """Every file the test's databases keep their data in (rows, journal, WAL)."""
        if self.server is None:
            return [p for p in self.folder.glob("*.db*") if p.is_file()]
        return self.server.database_files()

    def drop(self) -> None:
        if self.server is not None:
            for url in self._created:
                self.server.drop_schema(url)
