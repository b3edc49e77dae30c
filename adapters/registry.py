"""The registry as one object: catalog (names, versions, aliases), blob store, local cache.

Built from settings by the CLI, the router and the vLLM plugin, so all three
agree on where things are. Its tables are the catalog's plus those of lifecycle.py
and quality_records.py (one schema, on the catalog's metadata).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from loraplex.adapters.blob_cache import BlobCache
from loraplex.adapters.blob_store import BlobStore, open_blob_store
from loraplex.adapters.catalog import Catalog, DeleteResult
from loraplex.adapters.lifecycle import remove_adapter, remove_if_empty
from loraplex.adapters.names import AdapterName
from loraplex.adapters.quality_records import VersionQuality, record_served_eval, version_quality

GIB = 1 << 30


@dataclass(frozen=True)
class VersionDeleted(DeleteResult):
    adapter_removed: bool = False
    """It was the adapter's last version: the entry is gone (lifecycle.py), and a local
    adapter folder of the same name is served again."""


@dataclass(frozen=True)
class RegistryConfig:
    database_url: str
    store: str
    """A folder, or `s3://bucket/prefix`."""
    s3_endpoint_url: str | None
    cache_dir: Path
    cache_bytes: int

    @classmethod
    def from_settings(cls, settings: Any) -> RegistryConfig:
        """From ServeSettings, where the defaults live (duck-typed: adapters/ does not import
        the settings)."""
        return cls(
            database_url=settings.resolved_database_url(),
            store=settings.registry_store,
            s3_endpoint_url=settings.registry_s3_endpoint_url or None,
            cache_dir=Path(settings.registry_cache_dir),
            cache_bytes=int(settings.registry_cache_gib * GIB),
        )


@dataclass
class Registry:
    catalog: Catalog
    store: BlobStore
    cache: BlobCache

    @classmethod
    def open(cls, config: RegistryConfig) -> Registry:
        store = open_blob_store(config.store, config.s3_endpoint_url)
        return cls(
            Catalog.open(config.database_url),
            store,
            BlobCache(config.cache_dir, store, config.cache_bytes),
        )

    def delete_version(self, name: AdapterName, number: int, force: bool = False) -> VersionDeleted:
        """Delete one version from the catalog, then its blob if no version uses it any more;
        the adapter's entry goes with its last version."""
        result = self.catalog.delete_version(name, number, force=force)
        removed = remove_if_empty(self.catalog, name)
        if result.blob_unreferenced:
            # After the catalog commit: a failure here leaves an unreferenced blob, never
            # a version without its files.
            self.store.delete(result.deleted.digest)
        values = {f.name: getattr(result, f.name) for f in fields(result)}
        return VersionDeleted(**values, adapter_removed=removed)

    def delete_adapter(self, name: AdapterName) -> None:
        """Remove an adapter entry that has no version left (refused while it has some)."""
        remove_adapter(self.catalog, name)

    def quality(self, name: AdapterName) -> list[VersionQuality]:
        """Every version's training-time scores, gate decision and served evaluations."""
        return version_quality(self.catalog, name)

    def record_served_eval(
        self, name: AdapterName, number: int, evaluation: dict[str, Any]
    ) -> None:
        """Store one `adapters eval --record` result beside `name:vN`'s training-time scores."""
        record_served_eval(self.catalog, name, number, evaluation)
