"""Picker decision time: `pick()` alone, for the adapter-aware and round-robin pickers.

Replicas 4 / 16 / 64 x 1,000 adapters. Each replica holds 32 adapters (vLLM's
`max_cpu_loras`) and has 0-8 requests in flight; requests name a random adapter (one in
ten the base model) with 0-12 of its requests already in flight, so every branch of the
rule runs (home, wider candidate sets, spill) and most adapter decisions need the full
rendezvous order, not just the home: a harder mix than steady traffic, where most
adapters have few requests in flight. Per-call times from `perf_counter_ns`:

- warm: after one decision per adapter (the steady state, rendezvous scores cached);
- cold: the first decision for each adapter on a fresh picker (every score hashed).

Prints a table and writes JSON with the machine it ran on. Target (issue 13):
adapter-aware warm p50 <= 50 us at 16 replicas x 1,000 adapters.

Usage: python bench/picker_speed.py [--calls 20000] [--out bench/results/picker_speed.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

from bench_common import machine, percentile

from loraplex.router.picker import AdapterAwarePicker, ReplicaState, RoundRobinPicker

REPLICA_COUNTS = (4, 16, 64)
ADAPTERS = 1000
HELD_PER_REPLICA = 32
BASE_SHARE = 0.1


def make_replicas(count: int, adapters: list[str], rng: random.Random) -> list[ReplicaState]:
    return [
        ReplicaState(
            f"http://10.0.{i // 256}.{i % 256}:8100",
            rng.randint(0, 8),
            frozenset(rng.sample(adapters, HELD_PER_REPLICA)),
        )
        for i in range(count)
    ]


def make_requests(adapters: list[str], calls: int, rng: random.Random) -> list:
    return [
        (None if rng.random() < BASE_SHARE else rng.choice(adapters), rng.randint(0, 12))
        for _ in range(calls)
    ]


def time_calls(picker, replicas: list[ReplicaState], requests: list) -> list[float]:
    """Microseconds per `pick()`, one timer pair around each call."""
    pick = picker.pick
    clock = time.perf_counter_ns
    times = []
    for adapter, adapter_in_flight in requests:
        started = clock()
        pick(adapter, replicas, adapter_in_flight)
        times.append((clock() - started) / 1000)
    return times


def summary(times: list[float]) -> dict:
    return {"p50_us": percentile(times, 0.5), "p95_us": percentile(times, 0.95)}


def timer_overhead_us() -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(10_000):
        started = clock()
        samples.append((clock() - started) / 1000)
    return percentile(samples, 0.5)


def measure(count: int, calls: int, seed: int) -> dict:
    rng = random.Random(seed)
    adapters = [f"lpx-{rng.getrandbits(256):064x}" for _ in range(ADAPTERS)]
    replicas = make_replicas(count, adapters, rng)
    requests = make_requests(adapters, calls, rng)
    row = {}
    for label, picker_type in (("affinity", AdapterAwarePicker), ("round-robin", RoundRobinPicker)):
        picker = picker_type()
        cold = time_calls(picker, replicas, [(a, 0) for a in adapters])
        time_calls(picker, replicas, requests[: calls // 10])  # warm the interpreter
        warm = time_calls(picker, replicas, requests)
        kinds = Counter(picker.pick(a, replicas, n).kind for a, n in requests)
        row[label] = {"warm": summary(warm), "cold": summary(cold), "decisions": dict(kinds)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/picker_speed.json"))
    args = parser.parse_args()

    # A collection pause inside a timed call is noise of the process, not of the picker.
    gc.disable()
    rows = {count: measure(count, args.calls, args.seed) for count in REPLICA_COUNTS}
    gc.enable()

    print(f"pick() time, us ({ADAPTERS} adapters, {args.calls} calls; warm = scores cached)")
    print(f"{'replicas':>8} | {'picker':<11} | warm p50 | warm p95 | cold p50 | cold p95")
    for count, row in rows.items():
        for label, result in row.items():
            warm, cold = result["warm"], result["cold"]
            print(
                f"{count:>8} | {label:<11} | {warm['p50_us']:8.1f} | {warm['p95_us']:8.1f}"
                f" | {cold['p50_us']:8.1f} | {cold['p95_us']:8.1f}"
            )
    overhead = timer_overhead_us()
    print(f"timer overhead (included above): {overhead:.2f} us per call")

    # Other processes on a 2-core machine inflate these times; the load says how much.
    load_1m = os.getloadavg()[0]
    print(f"load average (1 min) during the run: {load_1m:.2f}")
    report = {
        "machine": machine(),
        "load_average_1m": load_1m,
        "workload": {
            "adapters": ADAPTERS,
            "held_per_replica": HELD_PER_REPLICA,
            "base_share": BASE_SHARE,
            "calls": args.calls,
            "seed": args.seed,
        },
        "timer_overhead_us": overhead,
        "rows": {str(count): row for count, row in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
