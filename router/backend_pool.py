"""The set of vLLM replicas the router forwards to, and which of them may take traffic.

Replicas come from a static list of URLs or from DNS discovery (`dns:HOST:PORT`, e.g. a
Kubernetes headless Service, re-resolved every few seconds: new addresses join, vanished
ones leave). Each replica is checked twice over:

- actively: `GET /health` every `health_check_interval_s` (2 s timeout);
- passively: every forwarded request reports a transport error or a 502/503/504 as a
  failure and any other answer as a success (router/forwarding.py).

`eject_after_failures` consecutive failures (of either kind) eject a replica; a replica
never seen healthy is ejected by its first failed probe. An ejected replica is
re-admitted after `readmit_after_successes` passing probes, and the router then forgets
which adapters it held: it was most likely restarted, and its resolvers load adapters
again on demand.

The pool also keeps the router's record of each replica: requests in flight (in total and
per adapter) and the adapters it believes the replica holds, an LRU bounded like vLLM's
own host cache (`max_cpu_loras`). The picker (router/picker.py) reads a snapshot of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from loraplex.router.backend_client import BackendClient
from loraplex.router.metrics import (
    BACKEND_EJECTIONS,
    BACKEND_IN_FLIGHT,
    BACKEND_REPLICAS,
    BACKEND_UP,
    OVERFLOW_LABEL,
    LabelLimiter,
)
from loraplex.router.picker import ReplicaState
from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)

DISCOVERY_PREFIX = "dns:"
EjectionReason = Literal["health_check", "errors"]
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the host's current addresses."""


class EngineWatch(Protocol):
    """Whatever restarts engines (serving/supervisor.py's EngineSupervisor), seen from the
    router: while an engine is being (re)started, no replica being up is not fatal."""

    def restarting(self) -> bool: ...


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to now (all A/AAAA records), sorted."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def parse_discovery(spec: str) -> tuple[str, int]:
    """`dns:HOST:PORT` -> (HOST, PORT); ValueError naming the expected form otherwise."""
    host, _, port = spec.removeprefix(DISCOVERY_PREFIX).rpartition(":")
    if not spec.startswith(DISCOVERY_PREFIX) or not host or not port.isdigit():
        raise ValueError(f"backend_discovery must look like dns:HOST:PORT, got {spec!r}")
    return host, int(port)


def address_url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def split_urls(urls: str) -> list[str]:
    """A comma-separated list of URLs, trailing slashes removed, duplicates dropped."""
    seen: dict[str, None] = {}
    for url in urls.split(","):
        if url.strip():
            seen[url.strip().rstrip("/")] = None
    return list(seen)


class HeldAdapters:
    """The adapter ids the router believes one replica holds, least recently used first.

    Bounded like the engine's own LRU (`max_cpu_loras`): beyond it vLLM has evicted the
    oldest, so the record drops it too.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        # The picker reads a frozen copy on every request; rebuilt only when the set changes.
        self._frozen: frozenset[str] | None = frozenset()

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def claim(self, adapter_id: str) -> bool:
        """Mark the adapter as used on this replica; True when the record did not hold it
        (this request makes the replica load it)."""
        if adapter_id in self._ids:
            self._ids.move_to_end(adapter_id)
            return False
        self._ids[adapter_id] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        self._frozen = None
        return True

    def discard(self, adapter_id: str) -> None:
        if adapter_id in self._ids:
            del self._ids[adapter_id]
            self._frozen = None

    def clear(self) -> None:
        self._ids.clear()
        self._frozen = frozenset()

    def frozen(self) -> frozenset[str]:
        if self._frozen is None:
            self._frozen = frozenset(self._ids)
        return self._frozen


@dataclass(eq=False)
class Replica:
    url: str
    client: BackendClient
    label: str
    """The `backend` label of its metrics (bounded)."""
    held: HeldAdapters
    in_flight: int = 0
    admitted: bool = True
    proven: bool = False
    """Seen healthy at least once."""
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    _state: ReplicaState | None = field(default=None, repr=False)

    def state(self) -> ReplicaState:
        """The picker's snapshot, rebuilt only when in-flight or the record changed (every
        request snapshots every replica; most are unchanged since the last request)."""
        holds = self.held.frozen()
        state = self._state
        if state is None or state.in_flight != self.in_flight or state.holds is not holds:
            state = self._state = ReplicaState(self.url, self.in_flight, holds)
        return state


class BackendPool:
    def __init__(
        self,
        urls: Sequence[str] = (),
        *,
        discovery: tuple[str, int] | None = None,
        resolver: Resolver = resolve_addresses,
        timeout_s: float = 600.0,
        max_held_adapters: int = 32,
        health_check_interval_s: float = 2.0,
        discovery_interval_s: float = 5.0,
        eject_after_failures: int = 3,
        readmit_after_successes: int = 2,
        max_labels: int = 200,
        api_key: str = "",
    ) -> None:
        self.discovery = discovery
        self.api_key = api_key
        """The engine key every replica's client sends (backend_api_key)."""
        self.resolver = resolver
        self.timeout_s = timeout_s
        self.max_held_adapters = max_held_adapters
        self.health_check_interval_s = health_check_interval_s
        self.discovery_interval_s = discovery_interval_s
        self.eject_after_failures = eject_after_failures
        self.readmit_after_successes = readmit_after_successes
        self._label = LabelLimiter("backend", max_labels)
        self._replicas: dict[str, Replica] = {}
        self._up: list[Replica] | None = None  # cached; None after any change of the set
        # Requests in flight per adapter id, over all replicas (the picker's spill input).
        self._adapter_in_flight: Counter[str] = Counter()
        self._retiring: list[Replica] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._join(urls)

    @classmethod
    def from_settings(
        cls, settings: ServeSettings, urls: Sequence[str] | None = None
    ) -> BackendPool:
        """Replicas from `urls` when given, else `backend_discovery`, else `backend_url`."""
        discovery = None
        if urls is None:
            if settings.backend_discovery:
                discovery = parse_discovery(settings.backend_discovery)
                urls = ()
            else:
                urls = split_urls(settings.backend_url)
        if not urls and discovery is None:
            raise ValueError("no backends: set backend_url or backend_discovery")
        return cls(
            urls,
            discovery=discovery,
            timeout_s=settings.backend_timeout_s,
            max_held_adapters=settings.max_cpu_loras,
            health_check_interval_s=settings.health_check_interval_s,
            discovery_interval_s=settings.discovery_interval_s,
            eject_after_failures=settings.eject_after_failures,
            readmit_after_successes=settings.readmit_after_successes,
            max_labels=settings.metrics_max_label_values,
            api_key=settings.backend_api_key.get_secret_value(),
        )

    # ---- the set -------------------------------------------------------------------------

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def up(self) -> list[Replica]:
        """The replicas that may take traffic (do not modify the list)."""
        if self._up is None:
            self._up = [r for r in self._replicas.values() if r.admitted]
        return self._up

    def get(self, url: str) -> Replica:
        return self._replicas[url]

    def _join(self, urls: Iterable[str], admitted: bool = True) -> list[Replica]:
        """Add replicas; `admitted` False: they take traffic after their first passing probe."""
        joined = []
        for url in urls:
            url = url.rstrip("/")
            if url in self._replicas:
                continue
            replica = Replica(
                url,
                BackendClient(url, timeout_s=self.timeout_s, api_key=self.api_key),
                self._label(url),
                HeldAdapters(self.max_held_adapters),
                admitted=admitted,
            )
            self._replicas[url] = replica
            joined.append(replica)
            BACKEND_UP.labels(replica.label).set(1 if admitted else 0)
            log.info("backend joined", extra={"backend": url})
        self._update_counts()
        return joined

    def _leave(self, urls: Iterable[str]) -> None:
        for url in urls:
            replica = self._replicas.pop(url, None)
            if replica is None:
                continue
            # Requests still running on it finish; its client closes once they have.
            self._retiring.append(replica)
            if replica.label != OVERFLOW_LABEL:
                for gauge in (BACKEND_UP, BACKEND_IN_FLIGHT):
                    with contextlib.suppress(KeyError):
                        gauge.remove(replica.label)
            log.warning("backend left", extra={"backend": url})
        self._update_counts()

    async def _close_retired(self) -> None:
        idle = [r for r in self._retiring if r.in_flight == 0]
        self._retiring = [r for r in self._retiring if r.in_flight > 0]
        for replica in idle:
            await replica.client.close()

    def _update_counts(self) -> None:
        self._up = None
        up = sum(1 for r in self._replicas.values() if r.admitted)
        BACKEND_REPLICAS.labels("up").set(up)
        BACKEND_REPLICAS.labels("ejected").set(len(self._replicas) - up)

    # ---- discovery -----------------------------------------------------------------------

    async def discover(self) -> None:
        """Re-resolve the discovery name: new addresses join (and take traffic once their
        first probe, right away, passes), vanished ones leave. A failed lookup keeps the
        current set (a DNS hiccup must not empty the pool)."""
        if self.discovery is None:
            return
        host, port = self.discovery
        try:
            addresses = await self.resolver(host, port)
        except OSError as exc:
            log.warning("backend discovery failed", extra={"host": host, "error": repr(exc)})
            return
        current = {address_url(a, port) for a in addresses}
        self._leave([url for url in self._replicas if url not in current])
        joined = self._join(sorted(current), admitted=False)
        await self._probe(joined)
        await self._close_retired()

    # ---- health --------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Probe every replica once, concurrently."""
        await self._probe(self.replicas)

    async def _probe(self, replicas: list[Replica]) -> None:
        results = await asyncio.gather(*(r.client.is_healthy(2.0) for r in replicas))
        for replica, healthy in zip(replicas, results, strict=True):
            if replica.url not in self._replicas:
                continue  # left while being probed
            if healthy:
                self._probe_passed(replica)
            else:
                self._probe_failed(replica)

    def _probe_passed(self, replica: Replica) -> None:
        # A replica never seen healthy (just joined) takes traffic at its first pass; one
        # that was ejected only after readmit_after_successes in a row.
        newcomer = not replica.proven
        replica.proven = True
        replica.consecutive_failures = 0
        replica.consecutive_successes += 1
        if not replica.admitted and (
            newcomer or replica.consecutive_successes >= self.readmit_after_successes
        ):
            replica.admitted = True
            # Most likely restarted: whatever it held is gone; its resolvers reload on demand.
            replica.held.clear()
            BACKEND_UP.labels(replica.label).set(1)
            self._update_counts()
            log.info("backend re-admitted", extra={"backend": replica.url})

    def _probe_failed(self, replica: Replica) -> None:
        replica.consecutive_successes = 0
        replica.consecutive_failures += 1
        if not replica.proven or replica.consecutive_failures >= self.eject_after_failures:
            self._eject(replica, "health_check")

    def record_failure(self, replica: Replica) -> None:
        """A forwarded request got a transport error or a 502/503/504 from this replica."""
        replica.consecutive_successes = 0
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self.eject_after_failures:
            self._eject(replica, "errors")

    def record_success(self, replica: Replica) -> None:
        """A forwarded request got any other answer from this replica."""
        replica.consecutive_failures = 0

    def _eject(self, replica: Replica, reason: EjectionReason) -> None:
        if not replica.admitted:
            return
        replica.admitted = False
        replica.consecutive_successes = 0
        BACKEND_UP.labels(replica.label).set(0)
        BACKEND_EJECTIONS.labels(replica.label, reason).inc()
        self._update_counts()
        log.warning(
            "backend ejected",
            extra={
                "backend": replica.url,
                "reason": reason,
                "consecutive_failures": replica.consecutive_failures,
            },
        )

    # ---- in-flight accounting ------------------------------------------------------------

    def begin(self, replica: Replica, adapter_id: str | None) -> None:
        replica.in_flight += 1
        if adapter_id is not None:
            self._adapter_in_flight[adapter_id] += 1
        BACKEND_IN_FLIGHT.labels(replica.label).set(replica.in_flight)

    def end(self, replica: Replica, adapter_id: str | None) -> None:
        replica.in_flight -= 1
        if adapter_id is not None:
            self._adapter_in_flight[adapter_id] -= 1
            if self._adapter_in_flight[adapter_id] <= 0:
                del self._adapter_in_flight[adapter_id]
        if self._replicas.get(replica.url) is replica:
            BACKEND_IN_FLIGHT.labels(replica.label).set(replica.in_flight)

    def adapter_in_flight(self, adapter_id: str) -> int:
        """This adapter's requests in flight, on all replicas."""
        return self._adapter_in_flight.get(adapter_id, 0)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve and probe once (so the app starts with a true picture), then keep doing
        both in the background."""
        await self.discover()
        await self.check_health()
        self._tasks.append(
            asyncio.create_task(self._every(self.health_check_interval_s, self.check_health))
        )
        if self.discovery is not None:
            self._tasks.append(
                asyncio.create_task(self._every(self.discovery_interval_s, self.discover))
            )

    async def _every(self, interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except Exception:
                log.exception("backend pool background job failed")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for replica in [*self._replicas.values(), *self._retiring]:
            await replica.client.close()
