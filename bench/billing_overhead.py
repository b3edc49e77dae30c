"""Router-only overhead of a tenant's request: API key, token quota if `--quota` (admitted,
then charged from usage), per-tenant `cache_salt`, and for streams the per-chunk usage the
router asks for and takes out again. Against the instant stub backend
(bench/stub_backend.py), router minus direct per pair of sequential requests (pair order
alternating), non-streamed and streamed, and the router process's CPU time per request.

Compare code versions by running it under each (e.g. `PYTHONPATH=<installed old tree>`):
the router it starts is `python -m loraplex.cli serve` with this interpreter and path.

Run it from bench/ to compare trees (the repository root's `loraplex` folder would shadow
PYTHONPATH). Usage: python bench/billing_overhead.py [--samples 500] [--chunks 16]
[--quota] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import (
    percentile,
    stub_and_router,
    write_report,
)

from loraplex.database import shared_engine
from loraplex.router.tenancy.store import TenancyStore

MODEL = "SmolLM2-135M-Instruct"


def _once(client: httpx.Client, url: str, body: dict, headers: dict) -> float:
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        response.read()
    return time.perf_counter() - started


def cpu_s(pid: int) -> float:
    """CPU time (user + system) a process has used, in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def added_ms(stub: str, router: str, key: str, body: dict, count: int) -> list[float]:
    """Router-minus-direct latency per pair, in ms."""
    differences = []
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=60) as client:
        for index in range(count):
            # Alternate which goes first: the first after a pause pays the wake-up.
            order = [(stub, {}), (router, auth)] if index % 2 else [(router, auth), (stub, {})]
            timings = {url: _once(client, url, body, headers) for url, headers in order}
            differences.append((timings[router] - timings[stub]) * 1000)
    return differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=16, help="tokens (chunks) per stream")
    parser.add_argument(
        "--quota",
        action="store_true",
        help="give the tenant a token quota (two database writes per request: admit, settle)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/billing_overhead.json"))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lpx-billing-bench-"))
    database_url = f"sqlite:///{root}/loraplex.db"
    store = TenancyStore(shared_engine(database_url))
    store.create_tenant("bench")
    key, _ = store.create_key("bench")
    if args.quota:
        store.set_quota("bench", tokens_per_minute=10**9)  # admitted and charged, never refused
    report: dict[str, float] = {}
    with stub_and_router(
        "--database-url", database_url, "--adapters-dir", str(root / "adapters")
    ) as (stub, router, router_process):
        bodies = {
            "non-streamed": {"model": MODEL, "prompt": "Hi", "max_tokens": 1},
            "stream": {"model": MODEL, "prompt": "Hi", "max_tokens": args.chunks, "stream": True},
        }
        for label, body in bodies.items():
            added_ms(stub, router, key, body, 50)  # warm both paths
            cpu_before = cpu_s(router_process.pid)
            differences = added_ms(stub, router, key, body, args.samples)
            # The router's own CPU per request: unlike latency, barely moved by other
            # processes on a busy machine (includes its health checks, ~1 per 2 s).
            cpu_ms = (cpu_s(router_process.pid) - cpu_before) * 1000 / args.samples
            p50, p95 = percentile(differences, 0.5), percentile(differences, 0.95)
            report |= {
                f"{label}_added_ms_p50": p50,
                f"{label}_added_ms_p95": p95,
                f"{label}_router_cpu_ms": cpu_ms,
            }
            print(
                f"router-only overhead, tenant {label} ({args.samples} sequential requests"
                f"{f', {args.chunks} chunks' if body.get('stream') else ''}): "
                f"p50 {p50:.2f} ms, p95 {p95:.2f} ms; router CPU {cpu_ms:.2f} ms per request",
                flush=True,
            )
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
