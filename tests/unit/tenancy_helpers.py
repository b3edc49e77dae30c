"""A settable clock and a migrated tenancy store, shared by the tenancy and quota tests."""

from __future__ import annotations

from loraplex.database import create_db_engine, migrate
from loraplex.router.tenancy.store import TenancyStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def migrated_store(database_url: str, clock: Clock) -> TenancyStore:
    """A TenancyStore on a fresh database (SQLite or PostgreSQL), schema migrated, time from
    `clock`."""
    engine = create_db_engine(database_url)
    migrate(engine)
    return TenancyStore(engine, clock=clock)
