"""Router overhead: the same workload sent straight to vLLM and through the loraplex router.

Starts one `loraplex serve` (vLLM backend + router, as in production), warms both
paths, then alternates rounds direct/router so drift hits both equally. Prints a
table and writes JSON. Two measurements:

- throughput: N requests x T output tokens (ignore_eos), concurrency C, mixed over the
  base model and the demo adapters; ratio router/direct.
- added latency: sequential 1-token requests, router minus direct, p50 and p95;
- router-only overhead: the same sequential requests against an instant stub backend
  (bench/stub_backend.py), where engine jitter cannot hide or fake the difference;
  the last rows send them with a tenant's API key to a router with tenants (SQLite),
  without and with quotas.

Usage: python bench/router_overhead.py [--requests 64] [--tokens 64] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from bench_common import (
    free_port,
    machine,
    percentile,
    serve_command,
    stub_and_router,
    wait_ready,
    write_report,
)

from loraplex.base_model import pull_embedded_model
from loraplex.training.demo_adapters import DEMO_ADAPTERS, ensure_demo_adapters

BASE_NAME = "SmolLM2-135M-Instruct"
PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a bicycle works.",
    "List some facts about the moon.",
    "Describe a busy market in the morning.",
]


# The engine's key (LORAPLEX_BACKEND_API_KEY below): vLLM answers 401 without it. The
# router, serving without keys on loopback, ignores it.
ENGINE_KEY = secrets.token_urlsafe(32)
AUTH = {"Authorization": f"Bearer {ENGINE_KEY}"}


async def throughput_round(url: str, models: list[str], args: argparse.Namespace) -> dict:
    semaphore = asyncio.Semaphore(args.concurrency)
    latencies: list[float] = []
    tokens = 0

    async with httpx.AsyncClient(base_url=url, timeout=600, headers=AUTH) as client:

        async def one(index: int) -> None:
            nonlocal tokens
            body = {
                "model": models[index % len(models)],
                "prompt": PROMPTS[index % len(PROMPTS)],
                "max_tokens": args.tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            async with semaphore:
                started = time.perf_counter()
                response = await client.post("/v1/completions", json=body)
                latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.requests)))
        elapsed = time.perf_counter() - started
    return {"tok_s": tokens / elapsed, "p50_s": percentile(latencies, 0.5)}


def added_latency(
    direct: str, router: str, models: list[str], count: int, headers: dict[str, str] = AUTH
) -> list[float]:
    """Per-pair difference of sequential 1-token requests (router minus direct), in ms.

    The order inside a pair alternates: the first request after an idle moment pays
    the engine's wake-up, which would otherwise be charged to one path only.
    """
    differences = []
    with httpx.Client(timeout=60, headers=headers) as client:
        for index in range(count):
            body = {"model": models[index % len(models)], "prompt": "Hi", "max_tokens": 1}
            timings = {}
            order = (direct, router) if index % 2 == 0 else (router, direct)
            for url in order:
                started = time.perf_counter()
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
                timings[url] = time.perf_counter() - started
            differences.append((timings[router] - timings[direct]) * 1000)
    return differences


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tenant_key(database_url: str, tenant: str, quotas: bool = False) -> str:
    """A new API key of `tenant` (created with the tenant) in `database_url`, via the CLI;
    `quotas`: limits the run never reaches on every kind (requests, tokens, concurrency),
    so each request is admitted and settled through the database."""
    cli = [sys.executable, "-m", "loraplex.cli"]
    subprocess.run(
        [*cli, "tenants", "create", tenant, "--database-url", database_url],
        check=True,
        capture_output=True,
    )
    if quotas:
        limits = ["--requests-per-minute", "1000000", "--tokens-per-minute", "100000000"]
        limits += ["--max-concurrent", "1000", "--database-url", database_url]
        subprocess.run(
            [*cli, "quotas", "set", "--tenant", tenant, *limits],
            check=True,
            capture_output=True,
        )
    created = subprocess.run(
        [*cli, "keys", "create", "--tenant", tenant, "--database-url", database_url],
        check=True,
        capture_output=True,
        text=True,
    )
    return created.stdout.strip()


def stub_overhead(
    models: list[str],
    adapters_dir: Path,
    count: int,
    tenants_db: Path | None = None,
    quotas: bool = False,
) -> tuple[list[float], float]:
    """Router-minus-direct latency against an instant stub backend, in ms, and the router
    process's CPU time per request in ms (less sensitive to a busy machine than latency).

    With `tenants_db` the router runs with tenants (a SQLite database) and the requests
    carry a key of tenant `demo`, which owns the demo adapters: the key lookup and the
    quota bookkeeping are in the measured path (`quotas`: with limits set, so every
    request is admitted and settled with database writes)."""
    flags, headers = ["--adapters-dir", str(adapters_dir)], AUTH
    if tenants_db is not None:
        tenants_db.unlink(missing_ok=True)
        database_url = f"sqlite:///{tenants_db}"
        headers = {"Authorization": f"Bearer {tenant_key(database_url, 'demo', quotas)}"}
        flags += ["--database-url", database_url]
    with stub_and_router(*flags) as (stub, router, process):
        added_latency(stub, router, models, 50, headers)  # warm both paths
        before = cpu_seconds(process.pid)
        differences = added_latency(stub, router, models, count, headers)
        return differences, (cpu_seconds(process.pid) - before) * 1000 / count


def stub_report(models: list[str], adapters_dir: Path, samples: int) -> dict:
    """Router-only overhead for the mixed models, then base model and one adapter alone
    (the adapter path resolves and rewrites names; the base path does not), then that
    adapter with a tenant's key (key lookup and the quota check), then with quotas set
    (admission and settlement write to the database). Printed."""
    report = {}
    tenants_db = adapters_dir.parent / "router-overhead-tenants.db"
    rows = (
        ("mixed", models, None, False),
        ("base", models[:1], None, False),
        ("adapter", models[1:2], None, False),
        ("tenant_adapter", models[1:2], tenants_db, False),
        ("tenant_quota_adapter", models[1:2], tenants_db, True),
    )
    for label, subset, database, quotas in rows:
        differences, cpu_ms = stub_overhead(subset, adapters_dir, samples, database, quotas)
        p50, p95 = percentile(differences, 0.5), percentile(differences, 0.95)
        report |= {f"stub_{label}_added_ms_p50": p50, f"stub_{label}_added_ms_p95": p95}
        report[f"stub_{label}_router_cpu_ms"] = cpu_ms
        print(
            f"router-only overhead, {label} {subset} ({samples} sequential requests, instant "
            f"stub backend): p50 {p50:.2f} ms, p95 {p95:.2f} ms, router CPU {cpu_ms:.2f} ms "
            "per request",
            flush=True,
        )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per path")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--stub-samples", type=int, default=1000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench/out/router_overhead.json"))
    parser.add_argument(
        "--stub-only", action="store_true", help="only the router-only overhead (no engine)"
    )
    args = parser.parse_args()

    model_dir = pull_embedded_model()
    adapters_dir = Path(
        os.environ.get("LORAPLEX_ADAPTERS_DIR", Path.home() / ".cache/loraplex/bench-adapters")
    )
    ensure_demo_adapters(model_dir, adapters_dir)
    models = [BASE_NAME, *(spec.name for spec in DEMO_ADAPTERS)]
    load_before = os.getloadavg()[0]
    stub = stub_report(models, adapters_dir, args.stub_samples)
    stub["load_average_1m"] = [load_before, os.getloadavg()[0]]
    if args.stub_only:
        write_report({**stub, "machine": machine()}, args.out)
        return 0
    port, backend_port = free_port(), free_port()
    router, direct = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{backend_port}"
    command = serve_command(
        port,
        "--backend-port",
        str(backend_port),
        "--dtype",
        args.dtype,
        "--log-level",
        "warning",
    )
    env = dict(
        os.environ, LORAPLEX_ADAPTERS_DIR=str(adapters_dir), LORAPLEX_BACKEND_API_KEY=ENGINE_KEY
    )
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        if not wait_ready(router, process):
            print("loraplex serve failed to start", file=sys.stderr)
            return 1
        # Warm-up through the router registers the adapters with vLLM for both paths.
        warm = argparse.Namespace(requests=8, tokens=8, concurrency=8)
        for url in (router, direct):
            asyncio.run(throughput_round(url, models, warm))

        results: dict[str, list[dict]] = {"direct": [], "router": []}
        for _ in range(args.rounds):
            for name, url in (("direct", direct), ("router", router)):
                results[name].append(asyncio.run(throughput_round(url, models, args)))
        differences = added_latency(direct, router, models, args.latency_samples)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)

    direct_tok_s = statistics.mean(r["tok_s"] for r in results["direct"])
    router_tok_s = statistics.mean(r["tok_s"] for r in results["router"])
    report = {
        "workload": {
            k: getattr(args, k) for k in ("requests", "tokens", "concurrency", "rounds", "dtype")
        },
        "models": models,
        "direct_tok_s": direct_tok_s,
        "router_tok_s": router_tok_s,
        "throughput_ratio": router_tok_s / direct_tok_s,
        "added_latency_ms_p50": percentile(differences, 0.5),
        "added_latency_ms_p95": percentile(differences, 0.95),
        **stub,
        "rounds": results,
    }
    print(
        f"\nworkload: {args.requests} requests x {args.tokens} tokens, "
        f"concurrency {args.concurrency}, models {models}, "
        f"{args.rounds} alternating rounds, dtype {args.dtype}"
    )
    print(f"{'path':<10}{'output tok/s':>14}{'ratio':>8}")
    print(f"{'direct':<10}{direct_tok_s:>14.1f}{1.0:>8.3f}")
    print(f"{'router':<10}{router_tok_s:>14.1f}{report['throughput_ratio']:>8.3f}")
    print(
        f"added latency per request ({args.latency_samples} sequential 1-token requests): "
        f"p50 {report['added_latency_ms_p50']:.2f} ms, "
        f"p95 {report['added_latency_ms_p95']:.2f} ms"
    )
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
