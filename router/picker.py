"""Which replica serves a request: the adapter-aware picker (and round-robin to compare).

Pure and synchronous, no I/O: the caller passes a snapshot of the replicas (in-flight
counts and which adapters it believes each holds) and gets a `Decision` back. The rule
(docs/routing.md has a worked example):

- base model (adapter_id None): the least-loaded replica (`least_loaded`);
- an adapter: order the replicas by rendezvous hash of (adapter_id, replica name); the
  candidates are the first k, k = min(n, 1 + floor(adapter_in_flight / spill_in_flight)),
  so a hot adapter spreads to more replicas and shrinks back when it cools;
- bounded load: a replica may take the request only if its in-flight is at or under
  c x the mean in-flight, the mean counting this request ((sum + 1) / n, at least 1);
- among candidates under the bound, one that holds the adapter (`affinity_hit`), else the
  least loaded (`miss`); if none is under it, the first replica under it further down the
  rendezvous order (`spill`); if none at all, the least loaded overall (`spill`);
- `exclude` removes replicas (those a failed request already tried); `NoReplica` when
  nothing is left.

Rendezvous (highest random weight) hashing gives each adapter a stable home while the
replica set is unchanged, and when a replica leaves only the adapters homed there move
(when one joins, ~1/(n+1) of them move to it). Scores use blake2b, not Python's `hash()`,
which is salted per process: every router process must agree on an adapter's home.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DecisionKind = Literal["least_loaded", "affinity_hit", "miss", "spill"]

# Scores are cached per adapter (a dict replica name -> score). One blake2b score costs
# ~1.9 us on the 2-core dev machine, so 16 replicas uncached would be ~30 us of a 50 us
# budget; cached, the whole decision is a few us (bench/picker_speed.py). The bounds keep
# memory flat under adapter churn (oldest adapter dropped first) and replica churn (an
# adapter's dict is rebuilt when pod IPs from DNS discovery have piled up in it); full,
# the cache holds 5.8 MB at 16 replicas and 17.5 MB at 64 (tracemalloc).
_MAX_CACHED_ADAPTERS = 4096
_MAX_CACHED_REPLICAS_PER_ADAPTER = 256


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """A snapshot of one replica as the router sees it."""

    name: str
    """The backend's URL; also the rendezvous hash input, so it must be stable."""
    in_flight: int
    """Requests the router has in flight on this replica."""
    holds: frozenset[str]
    """Adapter ids the router believes this replica holds (its own record)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The replica chosen for a request, and why (the `decision` label of
    `loraplex_picker_decisions_total`)."""

    replica: str
    kind: DecisionKind


class NoReplica(Exception):
    """No replica is left to pick: none given, or all of them excluded."""


def rendezvous_score(adapter_id: str, replica: str) -> float:
    """The stable weight of `replica` for `adapter_id`; the highest weight is home.

    53 bits of blake2b as a float, exact (so the same in every process): CPython sorts a
    list of floats with a specialised compare, unlike ints above 2**30. The NUL separator
    keeps ("ab", "c") and ("a", "bc") apart.
    """
    digest = hashlib.blake2b(f"{adapter_id}\0{replica}".encode(), digest_size=8).digest()
    return float(int.from_bytes(digest, "big") >> 11)


def _eligible(replicas: Sequence[ReplicaState], exclude: frozenset[str]) -> Sequence[ReplicaState]:
    eligible = [r for r in replicas if r.name not in exclude] if exclude else replicas
    if not eligible:
        raise NoReplica(f"no replica left to pick ({len(replicas)} given, {len(exclude)} excluded)")
    return eligible


def _least_loaded(replicas: Sequence[ReplicaState]) -> ReplicaState:
    """The replica with the fewest requests in flight; the first one on a tie."""
    best = replicas[0]
    for replica in replicas:
        if replica.in_flight < best.in_flight:
            best = replica
    return best


class _Scores(dict[str, float]):
    """One adapter's rendezvous scores by replica name, each hashed on first use."""

    def __init__(self, adapter_id: str) -> None:
        super().__init__()
        self.adapter_id = adapter_id

    def __missing__(self, replica: str) -> float:
        score = self[replica] = rendezvous_score(self.adapter_id, replica)
        return score


class AdapterAwarePicker:
    """Rendezvous-hashed homes per adapter, widened under load, with bounded load."""

    def __init__(self, load_factor: float = 1.25, spill_in_flight: float = 4.0) -> None:
        if not (math.isfinite(load_factor) and load_factor >= 1.0):
            raise ValueError(f"load_factor must be a finite number >= 1.0, got {load_factor!r}")
        if not (math.isfinite(spill_in_flight) and spill_in_flight > 0):
            raise ValueError(
                f"spill_in_flight must be a finite number > 0, got {spill_in_flight!r}"
            )
        self.load_factor = load_factor
        self.spill_in_flight = spill_in_flight
        self._scores: dict[str, _Scores] = {}

    def _scores_of(self, adapter_id: str) -> _Scores:
        scores = self._scores.get(adapter_id)
        if scores is None or len(scores) > _MAX_CACHED_REPLICAS_PER_ADAPTER:
            if scores is None and len(self._scores) >= _MAX_CACHED_ADAPTERS:
                del self._scores[next(iter(self._scores))]
            scores = self._scores[adapter_id] = _Scores(adapter_id)
        return scores

    def pick(
        self,
        adapter_id: str | None,
        replicas: Sequence[ReplicaState],
        adapter_in_flight: int = 0,
        exclude: frozenset[str] = frozenset(),
    ) -> Decision:
        """Choose a replica for one request.

        `adapter_in_flight` is the number of this adapter's requests already in flight
        across all replicas (not counting this one); `exclude` names replicas not to pick.
        Raises `NoReplica` when no replica is left.
        """
        eligible = _eligible(replicas, exclude)
        if adapter_id is None:
            return Decision(_least_loaded(eligible).name, "least_loaded")

        count = len(eligible)
        total = 0
        for replica in eligible:
            total += replica.in_flight
        mean = (total + 1) / count
        bound = self.load_factor * (mean if mean > 1.0 else 1.0)
        # Slicing caps k at the replica count; a negative count (a bookkeeping slip) is 0.
        k = 1 + int(adapter_in_flight // self.spill_in_flight) if adapter_in_flight > 0 else 1
        # Weights by C-level lookups (map, max, list.index) rather than a key lambda per
        # replica, and the full order only when the home alone cannot decide: a home
        # decision took 7 us at 16 replicas and 14 us at 64, sorting every time 10 and 27
        # (2-core dev machine, bench/picker_speed.py has the mixed workload).
        weights = list(map(self._scores_of(adapter_id).__getitem__, [r.name for r in eligible]))
        if k == 1:
            home = eligible[weights.index(max(weights))]
            if home.in_flight <= bound:
                kind: DecisionKind = "affinity_hit" if adapter_id in home.holds else "miss"
                return Decision(home.name, kind)
        order = [eligible[i] for i in sorted(range(count), key=weights.__getitem__, reverse=True)]
        holder: ReplicaState | None = None
        lightest: ReplicaState | None = None
        for replica in order[:k]:
            if replica.in_flight > bound:
                continue
            if adapter_id in replica.holds:
                if holder is None or replica.in_flight < holder.in_flight:
                    holder = replica
            elif lightest is None or replica.in_flight < lightest.in_flight:
                lightest = replica
        if holder is not None:
            return Decision(holder.name, "affinity_hit")
        if lightest is not None:
            return Decision(lightest.name, "miss")

        for replica in order[k:]:
            if replica.in_flight <= bound:
                return Decision(replica.name, "spill")
        # Not reached in practice: the least loaded replica is at or under the mean, so
        # under the bound. The rule's last resort all the same.
        return Decision(_least_loaded(eligible).name, "spill")


class RoundRobinPicker:
    """Cycles through the replicas, blind to adapters: the baseline for bench/scaleout.py.

    Reports the same decision kinds as `AdapterAwarePicker` (base model: `least_loaded`;
    an adapter: `affinity_hit` or `miss` by whether the chosen replica holds it) so the
    two pickers' `loraplex_picker_decisions_total` can be compared. Never `spill`.
    """

    def __init__(self) -> None:
        self._turn = itertools.count()

    def pick(
        self,
        adapter_id: str | None,
        replicas: Sequence[ReplicaState],
        adapter_in_flight: int = 0,
        exclude: frozenset[str] = frozenset(),
    ) -> Decision:
        """The next replica in turn, skipping `exclude`; raises `NoReplica` if none is left."""
        eligible = _eligible(replicas, exclude)
        replica = eligible[next(self._turn) % len(eligible)]
        if adapter_id is None:
            return Decision(replica.name, "least_loaded")
        return Decision(replica.name, "affinity_hit" if adapter_id in replica.holds else "miss")
