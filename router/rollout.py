"""Canary rollouts in the router: whose request is it (the sticky key), and the guard that
rolls a weighted alias back when its canary fails more than its incumbent.

The guard counts in the router (not Prometheus) and shares the counts through the
catalog (`Catalog.record_outcomes`), so every replica's requests add up and the first
replica whose counts trip the guard moves the alias back for all of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError

from loraplex.adapters.catalog import AliasEvent, Catalog
from loraplex.adapters.names import AdapterName
from loraplex.router.adapter_loading import ServedAdapter
from loraplex.router.version_metrics import ROLLOUT_ROLLBACKS, VersionLabels

log = logging.getLogger(__name__)

SESSION_HEADER = "x-loraplex-session"


def user_key(body_user: object, headers: Mapping[str, str]) -> str | None:
    """Whose request this is, for a sticky pick: the OpenAI `user` field, else the
    `x-loraplex-session` header, else the API key (hashed: the key itself is never kept),
    else None (a random pick)."""
    if isinstance(body_user, str) and body_user:
        return "user:" + body_user
    session = headers.get(SESSION_HEADER)
    if session:
        return "session:" + session
    authorization = headers.get("authorization")
    if authorization:
        return "key:" + hashlib.sha256(authorization.encode()).hexdigest()
    return None


_Key = tuple[AdapterName, str, datetime]


class RolloutGuardian:
    """Adds the outcomes of guarded aliases' requests to the catalog's shared counters.

    A server error is written before its answer leaves the router, so the request after
    the one that trips the guard (on any replica) already gets the incumbent; successes
    are written in the background, batched, and add no latency (one write, about a
    millisecond on an idle SQLite, 30 ms measured on the busy 2-core CI machine). Under
    concurrency one write carries what every request counted during the previous one."""

    def __init__(self, catalog: Catalog, labels: VersionLabels) -> None:
        self.catalog = catalog
        self.labels = labels
        self._pending: dict[_Key, dict[int, list[int]]] = {}
        self._lock: asyncio.Lock | None = None
        self._background: asyncio.Task[None] | None = None

    async def record(self, adapter: ServedAdapter, server_error: bool) -> None:
        if adapter.alias is None or adapter.generation is None or adapter.version is None:
            return
        key = (adapter.name, adapter.alias, adapter.generation)
        counts = self._pending.setdefault(key, {}).setdefault(adapter.version, [0, 0])
        counts[0] += 1
        counts[1] += int(server_error)
        if server_error:
            await self._write_pending()
        elif self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._pending:
            await self._write_pending()

    async def _write_pending(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self._pending:
                return  # a write that ran while this one waited took its counts
            batch, self._pending = self._pending, {}
            events = await asyncio.to_thread(self._write, batch)
        for name, event in events:
            adapter_label, alias_label = self.labels.adapter_alias(str(name), event.alias)
            ROLLOUT_ROLLBACKS.labels(adapter_label, alias_label, "error_rate").inc()
            log.warning(
                "canary rolled back: %s",
                event.detail,
                extra={"adapter": str(name), "alias": event.alias, "reason": "error_rate"},
            )

    def _write(
        self, batch: dict[_Key, dict[int, list[int]]]
    ) -> list[tuple[AdapterName, AliasEvent]]:
        events = []
        for (name, alias, generation), outcomes in batch.items():
            counted = {number: (c[0], c[1]) for number, c in outcomes.items()}
            try:
                event = self.catalog.record_outcomes(name, alias, generation, counted)
            except (SQLAlchemyError, LookupError) as exc:
                # Requests are served regardless; these counts are lost, the guard still
                # judges the next run on the counts that reach the catalog.
                log.error(
                    "could not record rollout outcomes",
                    extra={"adapter": str(name), "alias": alias, "error": repr(exc)},
                )
                continue
            if event is not None:
                events.append((name, event))
        return events
