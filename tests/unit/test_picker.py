"""The replica picker (router/picker.py): which replica a request goes to, and why."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loraplex.router.picker import (
    AdapterAwarePicker,
    Decision,
    NoReplica,
    ReplicaState,
    RoundRobinPicker,
    rendezvous_score,
)

ADAPTERS = [f"lpx-{index:064x}" for index in range(2000)]


def name(index: int) -> str:
    return f"http://10.0.0.{index}:8100"


def replicas(
    count: int, in_flight: dict[int, int] | None = None, holds: dict[int, set[str]] | None = None
) -> list[ReplicaState]:
    in_flight = in_flight or {}
    holds = holds or {}
    return [
        ReplicaState(name(i), in_flight.get(i, 0), frozenset(holds.get(i, ())))
        for i in range(count)
    ]


def rendezvous_order(adapter_id: str, names: list[str]) -> list[str]:
    """The expected order, from the published score function (home first)."""
    return sorted(names, key=lambda n: rendezvous_score(adapter_id, n), reverse=True)


def homes(picker: AdapterAwarePicker, pool: list[ReplicaState], adapters: list[str]) -> dict:
    return {adapter: picker.pick(adapter, pool).replica for adapter in adapters}


def homes_excluding(picker: AdapterAwarePicker, pool: list[ReplicaState], exclude: frozenset):
    return {a: picker.pick(a, pool, exclude=exclude).replica for a in ADAPTERS}


# --- stability and the rendezvous property -------------------------------------------


def test_an_adapter_goes_to_the_same_replica_across_calls_instances_and_orderings():
    pool = replicas(5)
    first = homes(AdapterAwarePicker(), pool, ADAPTERS[:300])
    again = AdapterAwarePicker()
    shuffled = pool[:]
    random.Random(7).shuffle(shuffled)
    for _ in range(3):
        assert homes(again, pool, ADAPTERS[:300]) == first
    assert homes(AdapterAwarePicker(), shuffled, ADAPTERS[:300]) == first
    assert all(home == rendezvous_order(a, [r.name for r in pool])[0] for a, home in first.items())


def test_homes_spread_evenly_over_replicas():
    counts = Counter(homes(AdapterAwarePicker(), replicas(4), ADAPTERS[:1000]).values())
    assert len(counts) == 4
    assert all(200 <= count <= 300 for count in counts.values()), counts


def test_when_a_replica_leaves_only_its_adapters_move():
    picker = AdapterAwarePicker()
    pool = replicas(5)
    before = homes(picker, pool, ADAPTERS)
    gone = name(2)
    after = homes(picker, [r for r in pool if r.name != gone], ADAPTERS)
    moved = {a for a in ADAPTERS if before[a] != after[a]}
    assert moved == {a for a in ADAPTERS if before[a] == gone}
    # Excluding a replica (failover) sends each adapter where removing it would.
    assert homes_excluding(picker, pool, frozenset({gone})) == after


def test_when_a_replica_joins_about_one_in_n_plus_one_adapters_move_all_to_it():
    picker = AdapterAwarePicker()
    before = homes(picker, replicas(4), ADAPTERS)
    after = homes(picker, replicas(5), ADAPTERS)
    moved = [a for a in ADAPTERS if before[a] != after[a]]
    assert {after[a] for a in moved} == {name(4)}
    assert 0.16 <= len(moved) / len(ADAPTERS) <= 0.24  # 1/5 expected


# --- spill: the candidate set grows with the adapter's load ---------------------------

# With spill_in_flight 4 on 4 replicas: k = min(4, 1 + adapter_in_flight // 4).
SPILL_CASES = [(0, 1), (3, 1), (4, 2), (7, 2), (8, 3), (12, 4), (100, 4)]


@pytest.mark.parametrize(("adapter_in_flight", "k"), SPILL_CASES)
def test_candidates_grow_with_the_adapters_in_flight(adapter_in_flight, k):
    adapter = ADAPTERS[0]
    names = [name(i) for i in range(4)]
    order = rendezvous_order(adapter, names)
    # Load falls along the rendezvous order, so the least loaded candidate is the k-th;
    # a large load factor keeps the bound out of the way.
    load = {names.index(n): 10 - position for position, n in enumerate(order)}
    picker = AdapterAwarePicker(load_factor=100.0, spill_in_flight=4.0)
    decision = picker.pick(adapter, replicas(4, in_flight=load), adapter_in_flight)
    assert decision == Decision(order[k - 1], "miss")


def test_candidates_shrink_back_when_the_adapters_load_falls():
    """One picker through a rise and fall of the adapter's load: with load falling along
    the rendezvous order the pick is the k-th replica, so the ranks trace k."""
    adapter = ADAPTERS[1]
    names = [name(i) for i in range(4)]
    order = rendezvous_order(adapter, names)
    pool = replicas(4, in_flight={names.index(n): 10 - rank for rank, n in enumerate(order)})
    picker = AdapterAwarePicker(load_factor=100.0, spill_in_flight=4.0)
    ranks = [order.index(picker.pick(adapter, pool, n).replica) for n in (0, 4, 9, 13, 9, 5, 1)]
    assert ranks == [0, 1, 2, 3, 2, 1, 0]


# --- bounded load ---------------------------------------------------------------------


def test_a_busy_home_spills_down_the_rendezvous_order():
    adapter = ADAPTERS[2]
    names = [name(i) for i in range(4)]
    order = rendezvous_order(adapter, names)
    index = {n: i for i, n in enumerate(names)}
    picker = AdapterAwarePicker()  # c = 1.25
    # Home has 6 in flight: mean (6 + 1) / 4 = 1.75, bound 2.19: home is over it.
    busy_home = replicas(4, in_flight={index[order[0]]: 6})
    assert picker.pick(adapter, busy_home) == Decision(order[1], "spill")
    # Home and the next both over the bound (13 / 4 x 1.25 = 4.06): the third in order.
    both = replicas(4, in_flight={index[order[0]]: 6, index[order[1]]: 6})
    assert picker.pick(adapter, both) == Decision(order[2], "spill")
    # A holder over the bound is passed over too.
    held = replicas(4, in_flight={index[order[0]]: 6}, holds={index[order[0]]: {adapter}})
    assert picker.pick(adapter, held) == Decision(order[1], "spill")


def test_one_adapter_at_half_the_traffic_keeps_every_replica_near_the_mean():
    """32 clients in a closed loop (each sends its next request when one finishes) over 4
    replicas and 64 adapters, one adapter half of all requests: after every decision no
    replica has more than c x mean + 1 in flight, and the hot adapter spreads out."""
    rng = random.Random(13)
    count, clients, load_factor = 4, 32, 1.25
    picker = AdapterAwarePicker(load_factor=load_factor)
    in_flight = dict.fromkeys(map(name, range(count)), 0)
    held: dict[str, set[str]] = {n: set() for n in in_flight}
    adapter_in_flight: Counter[str] = Counter()
    running: list[tuple[str, str]] = []
    hot = ADAPTERS[0]
    kinds: Counter[str] = Counter()
    hot_replicas = set()
    for _ in range(20_000):
        if len(running) == clients:
            done_adapter, done_replica = running.pop(rng.randrange(clients))
            in_flight[done_replica] -= 1
            adapter_in_flight[done_adapter] -= 1
        adapter = hot if rng.random() < 0.5 else rng.choice(ADAPTERS[1:64])
        pool = [ReplicaState(n, in_flight[n], frozenset(held[n])) for n in in_flight]
        decision = picker.pick(adapter, pool, adapter_in_flight[adapter])
        kinds[decision.kind] += 1
        in_flight[decision.replica] += 1
        adapter_in_flight[adapter] += 1
        held[decision.replica].add(adapter)
        running.append((adapter, decision.replica))
        if adapter == hot:
            hot_replicas.add(decision.replica)
        mean = sum(in_flight.values()) / count
        assert max(in_flight.values()) <= load_factor * max(1.0, mean) + 1, in_flight
    # ~16 hot requests in flight cannot fit under one replica's bound (~10): it spread.
    assert len(hot_replicas) >= 2, hot_replicas
    assert kinds["affinity_hit"] > 0.8 * sum(kinds.values()), kinds  # adapters mostly stay put
    assert kinds["spill"] > 0, kinds


# --- holders, base model, exclusion, errors -------------------------------------------


def test_a_candidate_that_holds_the_adapter_is_preferred_to_an_idler_one():
    adapter = ADAPTERS[3]
    names = [name(i) for i in range(3)]
    order = rendezvous_order(adapter, names)
    index = {n: i for i, n in enumerate(names)}
    second = index[order[1]]
    picker = AdapterAwarePicker()
    # k = 2 (4 in flight for the adapter): the second in order holds it and has 1 in flight.
    pool = replicas(3, in_flight={second: 1}, holds={second: {adapter}})
    assert picker.pick(adapter, pool, adapter_in_flight=4) == Decision(order[1], "affinity_hit")
    # k = 1: a holder outside the candidates is not used; home is a miss.
    assert picker.pick(adapter, pool, adapter_in_flight=0) == Decision(order[0], "miss")


def test_the_base_model_goes_to_the_least_loaded_replica():
    pool = replicas(3, in_flight={0: 3, 1: 1, 2: 2}, holds={0: {ADAPTERS[0]}})
    assert AdapterAwarePicker().pick(None, pool) == Decision(name(1), "least_loaded")
    assert AdapterAwarePicker().pick(None, pool, exclude=frozenset({name(1)})) == Decision(
        name(2), "least_loaded"
    )


@pytest.mark.parametrize("picker_type", [AdapterAwarePicker, RoundRobinPicker])
@pytest.mark.parametrize("excluded", [{0}, {1, 3}, {0, 1, 2}])
def test_excluded_replicas_are_never_picked(picker_type, excluded):
    picker = picker_type()
    exclude = frozenset(map(name, excluded))
    pool = replicas(4, in_flight={i: 0 if i in excluded else 9 for i in range(4)})
    picked = {picker.pick(a, pool, 20, exclude).replica for a in [None, *ADAPTERS[:200]]}
    assert picked and not picked & exclude


@pytest.mark.parametrize("picker_type", [AdapterAwarePicker, RoundRobinPicker])
@pytest.mark.parametrize(
    ("pool", "exclude"),
    [([], frozenset()), (replicas(2), frozenset({name(0), name(1)}))],
    ids=["no replicas", "all excluded"],
)
@pytest.mark.parametrize("adapter", [None, ADAPTERS[0]], ids=["base", "adapter"])
def test_no_replica_left_raises(picker_type, pool, exclude, adapter):
    with pytest.raises(NoReplica):
        picker_type().pick(adapter, pool, exclude=exclude)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"load_factor": 0.9}, "load_factor"),
        ({"load_factor": float("nan")}, "load_factor"),
        ({"spill_in_flight": 0}, "spill_in_flight"),
        ({"spill_in_flight": -1.0}, "spill_in_flight"),
        ({"spill_in_flight": float("inf")}, "spill_in_flight"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        AdapterAwarePicker(**kwargs)


def test_round_robin_cycles_ignoring_adapters_and_reports_comparable_kinds():
    adapter = ADAPTERS[0]
    pool = replicas(3, in_flight={0: 9}, holds={1: {adapter}})
    picker = RoundRobinPicker()
    decisions = [picker.pick(adapter, pool) for _ in range(6)]
    assert [d.replica for d in decisions] == [name(i) for i in (0, 1, 2, 0, 1, 2)]
    assert [d.kind for d in decisions[:3]] == ["miss", "affinity_hit", "miss"]
    assert picker.pick(None, pool).kind == "least_loaded"
    skipped = {picker.pick(adapter, pool, exclude=frozenset({name(1)})).replica for _ in range(4)}
    assert skipped == {name(0), name(2)}


def rule_as_written(adapter, pool, adapter_in_flight, exclude, c=1.25, spill=4.0):
    """docs/routing.md's rule, spelled out without shortcuts."""
    pool = [r for r in pool if r.name not in exclude]
    if adapter is None:
        return Decision(min(pool, key=lambda r: r.in_flight).name, "least_loaded")
    bound = c * max(1.0, (sum(r.in_flight for r in pool) + 1) / len(pool))
    order = rendezvous_order(adapter, [r.name for r in pool])
    by_name = {r.name: r for r in pool}
    k = min(len(pool), 1 + int(max(adapter_in_flight, 0) // spill))
    under = [by_name[n] for n in order[:k] if by_name[n].in_flight <= bound]
    holders = [r for r in under if adapter in r.holds]
    if holders:
        return Decision(min(holders, key=lambda r: r.in_flight).name, "affinity_hit")
    if under:
        return Decision(min(under, key=lambda r: r.in_flight).name, "miss")
    return Decision(next(n for n in order if by_name[n].in_flight <= bound), "spill")


def test_decisions_follow_the_documented_rule_on_random_snapshots():
    rng = random.Random(5)
    picker = AdapterAwarePicker()
    adapters = ADAPTERS[:20]
    for _ in range(3000):
        count = rng.randint(1, 8)
        pool = [
            ReplicaState(name(i), rng.randint(0, 9), frozenset(rng.sample(adapters, 5)))
            for i in range(count)
        ]
        exclude = frozenset(name(i) for i in range(count) if rng.random() < 0.2)
        if len(exclude) == count:
            continue
        adapter = None if rng.random() < 0.1 else rng.choice(adapters)
        adapter_in_flight = rng.randint(-1, 20)
        expected = rule_as_written(adapter, pool, adapter_in_flight, exclude)
        assert picker.pick(adapter, pool, adapter_in_flight, exclude) == expected
