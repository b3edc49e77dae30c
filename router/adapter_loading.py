"""Resolve a request's `model` to the base model or an adapter, and explain a replica's
failure to load one.

Registry adapters (`tenant/name`, `tenant/name@alias`, `tenant/name:vN`) resolve
through the catalog on every request to an immutable, content-hashed version id,
which is the name the backend knows them by: publishing v2 or moving an alias
serves the new weights on the next request, and vLLM's prefix cache (keyed by
that name) can never hand out blocks computed with other weights. Adapters in
the local adapter folder keep working under their plain name.

The router does not load adapters into the engines: each replica's LoRA resolvers
(serving/plugin.py) fetch, verify and load the name the router forwards on its first
request, and vLLM's own LRU evicts (docs/scaleout.md, "One loading owner").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from loraplex.adapters.blob_store import BlobMissing, StoreUnavailable
from loraplex.adapters.catalog import AliasTarget, CatalogLookupError, UnknownAdapter
from loraplex.adapters.content import BlobCorrupt
from loraplex.adapters.local_store import LocalAdapterStore
from loraplex.adapters.names import AdapterName, InvalidAdapterName
from loraplex.adapters.refs import parse_adapter_ref
from loraplex.adapters.registry import Registry, RegistryConfig
from loraplex.adapters.splits import bucket, pick
from loraplex.router.catalog_cache import CachedCatalog
from loraplex.router.errors import APIError, database_unavailable, model_not_found
from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedAdapter:
    name: AdapterName
    """The adapter's name, without @alias or :vN."""
    requested: str
    """The `model` exactly as the client sent it."""
    id: str
    """The name the backend knows it by: the version id for registry adapters."""
    path: Path | None
    """Local adapters: their folder. Registry adapters: None (fetched into the cache)."""
    digest: str | None = None
    version: int | None = None
    alias: str | None = None
    """The alias the request named (or `latest` for a plain registry name)."""
    role: str = "single"
    """`single` (the reference names one version), or in a weighted alias `incumbent`
    (its heaviest version) or `canary`."""
    generation: datetime | None = None
    """When the alias was last set; its guard's counters belong to that setting."""
    guarded: bool = False
    """The alias has a rollback guard: this request's outcome is counted for it."""

    @property
    def description(self) -> str:
        return f"{self.name}:v{self.version}" if self.version is not None else str(self.name)


class AdapterResolver:
    def __init__(
        self, store: LocalAdapterStore, base_model_name: str, registry: Registry | None = None
    ) -> None:
        self.store = store
        self.base_model_name = base_model_name
        self.registry = registry
        # SQLite: answers reused until the file changes (router/catalog_cache.py).
        self._cached = CachedCatalog.for_catalog(registry.catalog) if registry else None

    @classmethod
    def from_settings(cls, settings: ServeSettings, store: LocalAdapterStore) -> AdapterResolver:
        registry = Registry.open(RegistryConfig.from_settings(settings))
        return cls(store, settings.base_model_name, registry)

    # ---- resolution ----------------------------------------------------------------------

    def resolve(self, model: str, user_key: str | None = None) -> ServedAdapter | None:
        """None for the base model; the adapter otherwise. Raises 400/404/503 APIErrors.

        A weighted alias picks one of its versions by weight, the same one for the same
        `user_key` (router/rollout.py `user_key`) while the weights stand. The catalog's
        answer is read on every request, or on SQLite reused only while the database
        file is unchanged (router/catalog_cache.py), so a changed split (or a rollback by
        any replica) applies to the next request on every replica."""
        if model == self.base_model_name:
            return None
        try:
            ref = parse_adapter_ref(model)
        except InvalidAdapterName as exc:
            raise APIError(400, f"Invalid model name: {exc}", param="model") from None
        if self.registry is not None and ref.name.tenant is not None:
            try:
                if self._cached is not None:
                    target = self._cached.resolve_target(model, ref)
                else:
                    target = self.registry.catalog.resolve_target(ref)
            except UnknownAdapter:
                pass  # maybe a local adapter folder
            except CatalogLookupError as exc:
                raise _not_found(model, str(exc)) from None
            except SQLAlchemyError as exc:
                log.error("catalog query failed", extra={"model": model, "error": repr(exc)})
                raise database_unavailable() from None
            else:
                return _served_version(ref.name, model, target, user_key)
        if not ref.is_plain:
            raise model_not_found(model)
        try:
            local = self.store.get(model)
        except InvalidAdapterName as exc:
            raise APIError(400, f"Invalid model name: {exc}", param="model") from None
        if local is None:
            raise model_not_found(model)
        return ServedAdapter(local.name, model, local.id, local.path)

    def close(self) -> None:
        if self._cached is not None:
            self._cached.close()

    def registry_models(self) -> list[tuple[str, int]]:
        """(name, created) of every registry adapter with a published version, for /v1/models.

        A database failure raises (the app answers 503 database_unavailable): a list
        silently missing the registry's adapters would look like a complete answer."""
        if self.registry is None:
            return []
        adapters = self.registry.catalog.list_adapters()
        return [
            (a.name, int(a.created_at.replace(tzinfo=timezone.utc).timestamp()))
            for a in adapters
            if "latest" in a.aliases
        ]

    # ---- when a replica could not load an adapter ------------------------------------------

    def diagnose(self, adapter: ServedAdapter, backend: str, backend_message: str) -> APIError:
        """The error for a replica's 404 on an adapter the router resolved.

        The replica's resolver turns every failure into a 404 (and logs why on the
        replica); the router checks the registry version itself so the client gets the
        real reason. Blocking (it may fetch from the store): run it off the event loop.
        """
        if adapter.digest is not None and self.registry is not None:
            try:
                self.registry.cache.ensure(adapter.digest)
            except BlobCorrupt as exc:
                log.error(
                    "adapter blob failed hash verification",
                    extra={
                        "adapter": adapter.description,
                        "digest": adapter.digest,
                        "error": str(exc),
                    },
                )
                return APIError(
                    500,
                    f"Adapter '{adapter.requested}' ({adapter.description}) cannot be served: "
                    f"its stored files fail hash verification ({exc}).",
                    param="model",
                    code="adapter_corrupt",
                )
            except BlobMissing:
                log.error("adapter blob missing from the store", extra={"digest": adapter.digest})
                return APIError(
                    500,
                    f"Adapter '{adapter.requested}' ({adapter.description}) cannot be served: "
                    "its files are missing from the adapter store.",
                    param="model",
                    code="adapter_load_failed",
                )
            except StoreUnavailable as exc:
                log.error("adapter store unavailable", extra={"error": str(exc)})
                return APIError(
                    503,
                    f"Adapter store unavailable, cannot fetch '{adapter.requested}': {exc}",
                    param="model",
                    code="store_unavailable",
                )
        log.error(
            "backend could not load adapter",
            extra={"adapter": adapter.description, "backend": backend, "error": backend_message},
        )
        return APIError(
            500,
            f"Adapter '{adapter.requested}' could not be loaded by backend {backend}: "
            f"{backend_message}",
            param="model",
            code="adapter_load_failed",
        )


def _served_version(
    name: AdapterName, model: str, target: AliasTarget, user_key: str | None
) -> ServedAdapter:
    """The version this request gets: the one named, or a pick from the alias's split."""
    record, role = target.incumbent, "single"
    if target.weighted:
        user_bucket = bucket(user_key, f"{name}@{target.alias}")
        number = pick([(v.number, w) for v, w in target.versions], user_bucket)
        record = next(v for v, _ in target.versions if v.number == number)
        role = "incumbent" if number == target.incumbent.number else "canary"
    return ServedAdapter(
        name,
        model,
        record.version_id,
        None,
        record.digest,
        record.number,
        alias=target.alias,
        role=role,
        generation=target.generation,
        guarded=target.weighted and target.guard is not None,
    )


def _not_found(model: str, detail: str) -> APIError:
    error = model_not_found(model)
    error.message = f"{error.message} ({detail})"
    return error
