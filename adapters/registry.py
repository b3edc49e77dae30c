"""The registry as one object: catalog (names, versions, aliases), blob store, local cache.

Built from settings by the CLI, the router and the vLLM plugin, so all three
agree on where things are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.blob_cache import BlobCache
from loraplex.adapters.blob_store import BlobStore, open_blob_store
from loraplex.adapters.catalog import Catalog, DeleteResult
from loraplex.adapters.names import AdapterName

GIB = 1 << 30


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

    def delete_version(self, name: AdapterName, number: int, force: bool = False) -> DeleteResult:
        """Delete one version from the catalog, then its blob if no version uses it any more."""
        result = self.catalog.delete_version(name, number, force=force)
        if result.blob_unreferenced:
            # After the catalog commit: a failure here leaves an unreferenced blob, never
            # a version without its files.
            self.store.delete(result.deleted.digest)
        return result
