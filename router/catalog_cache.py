"""What the catalog answers for a reference, kept until the catalog changes (SQLite only).

Every adapter request resolves its name in the catalog, so that a publish, an alias
move, a changed split or a rollback applies to the next request on every router. On a
SQLite catalog the router can tell cheaply whether anything changed: SQLite's
`PRAGMA data_version` returns a different number after any other connection (any
process, any thread, this router's own pool included) committed a change to the file,
and costs ~6 µs (with a stat of the file, so a replaced or deleted file counts as a
change) against ~0.15 ms for the lookup through SQLAlchemy (measured on this
2-core machine). So answers are reused only while that number stands: no time-to-live,
nothing stale. Any write clears the whole cache (quota bookkeeping of a tenant request
writes too, so with tenants the cache helps less; answers stay exact). Other databases
(PostgreSQL for several router hosts) have no such counter: every request asks the
catalog, as before.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from loraplex.adapters.catalog import AliasTarget, Catalog, CatalogLookupError
from loraplex.adapters.refs import AdapterRef

MAX_ENTRIES = 4096
"""Distinct names kept (made-up names are answers too); past it the cache starts over."""


class CachedCatalog:
    """`resolve_target` of a SQLite catalog, reused while the database file is unchanged."""

    def __init__(self, catalog: Catalog, path: Path) -> None:
        self.catalog = catalog
        self._path = path
        self._watch: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None
        self._version: int | None = None
        self._answers: dict[str, AliasTarget | tuple[type[CatalogLookupError], str]] = {}

    @classmethod
    def for_catalog(cls, catalog: Catalog) -> CachedCatalog | None:
        """A cache for a catalog in a SQLite file; None for any other database."""
        url = catalog.engine.url
        database = url.database
        if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
            return None
        if url.query.get("mode") == "memory" or database.startswith("file:"):
            return None
        return cls(catalog, Path(database))

    def resolve_target(self, model: str, ref: AdapterRef) -> AliasTarget:
        """`Catalog.resolve_target(ref)` (its exceptions included) for the `model` string
        the reference was parsed from."""
        if self._changed():
            self._answers.clear()
        answer = self._answers.get(model)
        if answer is None:
            try:
                answer = self.catalog.resolve_target(ref)
            except CatalogLookupError as exc:  # UnknownAdapter too
                answer = (type(exc), str(exc))
            if len(self._answers) >= MAX_ENTRIES:
                self._answers.clear()
            self._answers[model] = answer
        if isinstance(answer, tuple):
            error, message = answer
            raise error(message)
        return answer

    def _changed(self) -> bool:
        """True unless the file is the one watched and nobody committed to it since the
        last call. A file that is gone or replaced (one stat, ~2 µs) is a change too, so
        the catalog is asked and its failure answers 503 as without this cache."""
        try:
            stat = os.stat(self._path)
            inode = (stat.st_dev, stat.st_ino)
            if self._watch is None or inode != self._inode:
                self.close()
                # A connection of its own that never writes: its data_version moves on
                # every commit made through any other connection.
                self._watch = sqlite3.connect(
                    self._path, isolation_level=None, check_same_thread=False
                )
                self._inode = inode
            version = self._watch.execute("PRAGMA data_version").fetchone()[0]
        except (OSError, sqlite3.Error):
            self.close()
            return True
        changed = version != self._version
        self._version = version
        return changed

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._watch, self._inode, self._version = None, None, None
