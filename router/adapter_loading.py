"""Resolve a request's `model` to the base model or a stored adapter, and make sure the
backend has that adapter registered before the request is forwarded."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from loraplex.adapters.local_store import LocalAdapter, LocalAdapterStore
from loraplex.adapters.names import InvalidAdapterName
from loraplex.router.backend_client import BackendClient
from loraplex.router.errors import APIError, model_not_found


class AdapterLoader:
    def __init__(self, store: LocalAdapterStore, backend: BackendClient, base_model_name: str):
        self.store = store
        self.backend = backend
        self.base_model_name = base_model_name
        self._registered: set[str] = set()
        # One lock per adapter: concurrent first requests for one adapter load it once.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def resolve(self, model: str) -> LocalAdapter | None:
        """None for the base model; the adapter otherwise. Raises 400/404 APIErrors."""
        if model == self.base_model_name:
            return None
        try:
            adapter = self.store.get(model)
        except InvalidAdapterName as exc:
            raise APIError(400, f"Invalid model name: {exc}", param="model") from None
        if adapter is None:
            raise model_not_found(model)
        return adapter

    async def ensure_registered(self, adapter: LocalAdapter) -> None:
        if adapter.id in self._registered:
            return
        async with self._locks[adapter.id]:
            if adapter.id in self._registered:
                return
            await self.backend.load_adapter(adapter.id, str(adapter.path))
            self._registered.add(adapter.id)

    def forget(self, adapter: LocalAdapter) -> None:
        """Called when the backend no longer knows the adapter (e.g. it restarted)."""
        self._registered.discard(adapter.id)
