"""Resolve a request's `model` to the base model or an adapter, and make sure the backend
has that adapter registered before the request is forwarded.

Registry adapters (`tenant/name`, `tenant/name@alias`, `tenant/name:vN`) resolve
through the catalog on every request to an immutable, content-hashed version id,
which is the name the backend knows them by: publishing v2 or moving an alias
serves the new weights on the next request, and vLLM's prefix cache (keyed by
that name) can never hand out blocks computed with other weights. Adapters in
the local adapter folder keep working under their plain name.

The backend's list of registered adapters is bounded: beyond `max_registered`
the least recently used one is unregistered (pinned ones never are).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.exc import SQLAlchemyError

from loraplex.adapters.blob_store import BlobMissing, StoreUnavailable
from loraplex.adapters.catalog import CatalogLookupError, UnknownAdapter
from loraplex.adapters.content import BlobCorrupt
from loraplex.adapters.local_store import LocalAdapterStore
from loraplex.adapters.names import AdapterName, InvalidAdapterName
from loraplex.adapters.refs import parse_adapter_ref
from loraplex.adapters.registry import Registry
from loraplex.router.backend_client import BackendClient
from loraplex.router.errors import APIError, model_not_found
from loraplex.router.metrics import (
    ADAPTER_EVICTIONS,
    ADAPTER_LOAD_DURATION,
    ADAPTER_LOADS,
    LabelLimiter,
)

log = logging.getLogger(__name__)

# Distinct adapter label values on the load metrics by default; the rest count as `other`.
MAX_ADAPTER_LABELS = 200


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

    @property
    def description(self) -> str:
        return f"{self.name}:v{self.version}" if self.version is not None else str(self.name)


class AdapterLoader:
    def __init__(
        self,
        store: LocalAdapterStore,
        backend: BackendClient,
        base_model_name: str,
        registry: Registry | None = None,
        max_registered: int = 64,
        pinned: frozenset[str] = frozenset(),
        max_labels: int = MAX_ADAPTER_LABELS,
    ) -> None:
        self.store = store
        self.backend = backend
        self.base_model_name = base_model_name
        self.registry = registry
        self.max_registered = max_registered
        self.pinned = pinned
        # Registered with the backend, least recently used first; value: pinned.
        self._registered: OrderedDict[str, bool] = OrderedDict()
        # One lock per adapter: concurrent first requests for one adapter load it once.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._label = LabelLimiter("adapter", max_labels)
        # Requests on their way to the backend, per backend name.
        self._in_use: Counter[str] = Counter()

    @classmethod
    def from_settings(
        cls, settings: Any, store: LocalAdapterStore, backend: BackendClient
    ) -> AdapterLoader:
        from loraplex.adapters.registry import RegistryConfig

        registry = Registry.open(RegistryConfig.from_settings(settings))
        pinned = frozenset(p.strip() for p in settings.pinned_adapters.split(",") if p.strip())
        return cls(
            store,
            backend,
            settings.base_model_name,
            registry,
            max_registered=settings.max_backend_adapters,
            pinned=pinned,
            max_labels=settings.metrics_max_label_values,
        )

    # ---- resolution ----------------------------------------------------------------------

    def resolve(self, model: str) -> ServedAdapter | None:
        """None for the base model; the adapter otherwise. Raises 400/404/503 APIErrors."""
        if model == self.base_model_name:
            return None
        try:
            ref = parse_adapter_ref(model)
        except InvalidAdapterName as exc:
            raise APIError(400, f"Invalid model name: {exc}", param="model") from None
        if self.registry is not None and ref.name.tenant is not None:
            try:
                record = self.registry.catalog.resolve(ref)
            except UnknownAdapter:
                pass  # maybe a local adapter folder
            except CatalogLookupError as exc:
                raise _not_found(model, str(exc)) from None
            except SQLAlchemyError as exc:
                log.error("catalog query failed", extra={"model": model, "error": repr(exc)})
                raise APIError(
                    503, "Adapter catalog unavailable", param="model", code="catalog_unavailable"
                ) from None
            else:
                return ServedAdapter(
                    ref.name, model, record.version_id, None, record.digest, record.number
                )
        if not ref.is_plain:
            raise model_not_found(model)
        try:
            local = self.store.get(model)
        except InvalidAdapterName as exc:
            raise APIError(400, f"Invalid model name: {exc}", param="model") from None
        if local is None:
            raise model_not_found(model)
        return ServedAdapter(local.name, model, local.id, local.path)

    def registry_models(self) -> list[tuple[str, int]]:
        """(name, created) of every registry adapter with a published version, for /v1/models."""
        if self.registry is None:
            return []
        try:
            adapters = self.registry.catalog.list_adapters()
        except SQLAlchemyError:
            log.exception("catalog query failed while listing models")
            return []
        return [
            (a.name, int(a.created_at.replace(tzinfo=timezone.utc).timestamp()))
            for a in adapters
            if "latest" in a.aliases
        ]

    # ---- registration with the backend ---------------------------------------------------

    async def send(
        self, adapter: ServedAdapter | None, path: str, body: bytes, stream: bool
    ) -> httpx.Response:
        """Forward a request, registering its adapter first. While the request is on its way,
        the adapter is in use and never unregistered to make room for another."""
        if adapter is None:
            return await self.backend.send(path, body, stream)
        self._in_use[adapter.id] += 1
        try:
            await self.ensure_registered(adapter)
            response = await self.backend.send(path, body, stream)
            if response.status_code == 404:
                # The backend lost the adapter (restarted, or unloaded by hand): re-register once.
                await response.aclose()
                self.forget(adapter)
                await self.ensure_registered(adapter)
                response = await self.backend.send(path, body, stream)
            return response
        finally:
            # The backend resolved the name when it accepted the request (headers or the
            # whole answer are back): unregistering it now no longer affects this request.
            self._in_use[adapter.id] -= 1
            if not self._in_use[adapter.id]:
                del self._in_use[adapter.id]

    async def ensure_registered(self, adapter: ServedAdapter) -> None:
        if adapter.id in self._registered and self._files_present(adapter):
            self._registered.move_to_end(adapter.id)
            return
        async with self._locks[adapter.id]:
            if adapter.id in self._registered and self._files_present(adapter):
                return
            label = self._label(str(adapter.name))
            started = time.monotonic()
            try:
                path = adapter.path or await asyncio.to_thread(self._fetch, adapter)
                await self.backend.load_adapter(adapter.id, str(path))
            except APIError:
                ADAPTER_LOADS.labels(adapter=label, result="error").inc()
                raise
            ADAPTER_LOADS.labels(adapter=label, result="success").inc()
            ADAPTER_LOAD_DURATION.observe(time.monotonic() - started)
            self._registered[adapter.id] = self._is_pinned(adapter)
            self._registered.move_to_end(adapter.id)
        await self._unregister_over_limit()

    def forget(self, adapter: ServedAdapter) -> None:
        """Called when the backend no longer knows the adapter (e.g. it restarted)."""
        self._registered.pop(adapter.id, None)

    @property
    def registered(self) -> list[str]:
        """Backend names of the registered adapters, least recently used first."""
        return list(self._registered)

    def _is_pinned(self, adapter: ServedAdapter) -> bool:
        return str(adapter.name) in self.pinned or adapter.requested in self.pinned

    def _files_present(self, adapter: ServedAdapter) -> bool:
        """The engine may reload an adapter from disk at any time (after evicting it from
        its own cache), so a registry version must still be in the disk cache."""
        if adapter.digest is None or self.registry is None:
            return True
        return self.registry.cache.touch(adapter.digest)

    def _fetch(self, adapter: ServedAdapter) -> Path:
        assert self.registry is not None and adapter.digest is not None
        try:
            return self.registry.cache.ensure(adapter.digest)
        except BlobCorrupt as exc:
            log.error(
                "adapter blob failed hash verification",
                extra={"adapter": adapter.description, "digest": adapter.digest, "error": str(exc)},
            )
            raise APIError(
                500,
                f"Adapter '{adapter.requested}' ({adapter.description}) cannot be served: its "
                f"stored files fail hash verification ({exc}).",
                param="model",
                code="adapter_corrupt",
            ) from None
        except BlobMissing:
            log.error("adapter blob missing from the store", extra={"digest": adapter.digest})
            raise APIError(
                500,
                f"Adapter '{adapter.requested}' ({adapter.description}) cannot be served: its "
                "files are missing from the adapter store.",
                param="model",
                code="adapter_load_failed",
            ) from None
        except StoreUnavailable as exc:
            log.error("adapter store unavailable", extra={"error": str(exc)})
            raise APIError(
                503,
                f"Adapter store unavailable, cannot fetch '{adapter.requested}': {exc}",
                param="model",
                code="store_unavailable",
            ) from None

    async def _unregister_over_limit(self) -> None:
        while len(self._registered) > self.max_registered:
            victim = next(
                (
                    name
                    for name, pinned in self._registered.items()
                    if not pinned and not self._in_use[name]
                ),
                None,
            )
            if victim is None:
                return  # everything left is pinned or in use; the next load tries again
            async with self._locks[victim]:
                if self._registered.pop(victim, None) is None:
                    continue
                try:
                    await self.backend.unload_adapter(victim)
                except APIError as exc:
                    # The backend forgets it on restart anyway; a re-register is harmless.
                    log.warning(
                        "could not unregister adapter",
                        extra={"adapter": victim, "error": exc.message},
                    )
            ADAPTER_EVICTIONS.inc()


def _not_found(model: str, detail: str) -> APIError:
    error = model_not_found(model)
    error.message = f"{error.message} ({detail})"
    return error
