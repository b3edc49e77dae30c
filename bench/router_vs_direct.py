"""Router ÷ direct vLLM with vLLM's own load client, and the router's own overhead.

1. One `loraplex serve` (vLLM backend + router). vLLM's benchmark client
   (bench/vllm_bench_serve.py, i.e. `vllm bench serve`) sends one workload — random
   dataset, 64 tokens in / 32 out (`ignore_eos`), 384 requests, 32 at a time, round-robin
   over the base model and three adapters, the same seed for both paths — straight to the
   engine and through the router. Paths interleave (the one that goes first alternates by
   round, so drift and the machine's other load hit both); ratio = router ÷ direct output
   tokens/s within a round.
2. Router-only overhead: `bench/router_overhead.py --stub-only` (sequential requests
   against an instant stub backend, no engine), p50/p95 for base-model and adapter requests.

Prints a table and writes bench/results/router_vs_direct.json with the machine (CPU model,
ISA flags) and the load average around the run (the router shares the CPU with the engine).

Usage: python bench/router_vs_direct.py [--rounds 3] [--requests 384] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import free_port, machine, serve_command, wait_ready, write_report

from loraplex.base_model import pull_embedded_model
from loraplex.training.demo_adapters import DEMO_ADAPTERS, DemoAdapterSpec, ensure_demo_adapters

BENCH = Path(__file__).resolve().parent
BASE_NAME = "SmolLM2-135M-Instruct"
# The two demo adapters and a third, so the workload spans base + 3 adapters.
ADAPTERS = (*DEMO_ADAPTERS, DemoAdapterSpec("bench/gamma", rank=8, seed=3, strength=0.4))
# The engine's key: vLLM answers 401 without it; the router (no tenants, loopback) needs none.
ENGINE_KEY = secrets.token_urlsafe(32)
# What each run reports, from vLLM's result JSON.
FIELDS = ("output_throughput", "request_throughput", "median_ttft_ms", "median_tpot_ms")


def load_client(
    url: str, models: list[str], args: argparse.Namespace, out: Path, **env: str
) -> dict:
    """One run of vLLM's client against `url`; its result JSON."""
    command = [
        sys.executable,
        str(BENCH / "vllm_bench_serve.py"),
        "--base-url",
        url,
        "--model",
        BASE_NAME,
        "--tokenizer",
        str(args.model_dir),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--ignore-eos",
        "--num-prompts",
        str(args.requests),
        "--max-concurrency",
        str(args.concurrency),
        "--lora-modules",
        *models,
        "--lora-assignment",
        "round-robin",
        "--seed",
        str(args.seed),
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    done = subprocess.run(
        command, env=dict(os.environ, **env), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"vLLM's client failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} of {args.requests} requests failed on {url}")
    return {field: result[field] for field in ("completed", "failed", "duration", *FIELDS)}


def engine_rounds(args: argparse.Namespace, work: Path) -> list[dict]:
    adapters_dir = Path(
        os.environ.get("LORAPLEX_ADAPTERS_DIR", Path.home() / ".cache/loraplex/bench-adapters")
    )
    ensure_demo_adapters(args.model_dir, adapters_dir, ADAPTERS)
    models = [BASE_NAME, *(spec.name for spec in ADAPTERS)]
    port, backend_port = free_port(), free_port()
    router, direct = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{backend_port}"
    command = serve_command(
        port, "--backend-port", str(backend_port), "--dtype", args.dtype, "--log-level", "warning"
    )
    env = dict(
        os.environ,
        LORAPLEX_ADAPTERS_DIR=str(adapters_dir),
        LORAPLEX_BACKEND_API_KEY=ENGINE_KEY,
        # Its own database and registry: no tenants (so no keys on loopback), nothing shared.
        LORAPLEX_DATABASE_URL=f"sqlite:///{work}/bench.db",
        LORAPLEX_REGISTRY_STORE=str(work / "store"),
        LORAPLEX_REGISTRY_CACHE_DIR=str(work / "registry-cache"),
    )
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    paths = {"direct": (direct, {"OPENAI_API_KEY": ENGINE_KEY}), "router": (router, {})}
    rounds = []
    try:
        if not wait_ready(router, process):
            raise RuntimeError("loraplex serve failed to start")
        warm = argparse.Namespace(**{**vars(args), "requests": 32})
        for name, (url, key) in paths.items():  # adapters loaded, both paths warm
            load_client(url, models, warm, work / f"warm-{name}.json", **key)
        for index in range(args.rounds):
            order = ["direct", "router"] if index % 2 == 0 else ["router", "direct"]
            runs = {}
            for name in order:
                url, key = paths[name]
                runs[name] = load_client(url, models, args, work / f"{index}-{name}.json", **key)
                print(f"round {index + 1} {name}: {runs[name]}", flush=True)
            ratio = runs["router"]["output_throughput"] / runs["direct"]["output_throughput"]
            rounds.append({"order": order, **runs, "ratio": ratio})
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    return rounds


def stub_overhead(work: Path) -> dict:
    """bench/router_overhead.py --stub-only: its JSON (p50/p95 for mixed, base, adapter)."""
    out = work / "stub.json"
    env = dict(os.environ, LORAPLEX_DATABASE_URL=f"sqlite:///{work}/stub.db")
    command = [sys.executable, str(BENCH / "router_overhead.py"), "--stub-only", "--out", str(out)]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per path")
    parser.add_argument("--requests", type=int, default=384, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (random)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens (ignore_eos)")
    parser.add_argument("--seed", type=int, default=0, help="random dataset seed (both paths)")
    parser.add_argument("--dtype", default="bfloat16", help="engine dtype")
    parser.add_argument("--skip-stub", action="store_true", help="no router-only overhead")
    parser.add_argument(
        "--out", type=Path, default=BENCH / "results" / "router_vs_direct.json", help="JSON"
    )
    args = parser.parse_args()
    args.model_dir = pull_embedded_model()
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="router-vs-direct-") as folder:
        work = Path(folder)
        rounds = engine_rounds(args, work)
        stub = {} if args.skip_stub else stub_overhead(work)
    report = {
        "command": "python bench/router_vs_direct.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "minutes": (time.time() - started) / 60,
        "workload": {
            "client": "vllm bench serve (bench/vllm_bench_serve.py), dataset random",
            "models": [BASE_NAME, *(spec.name for spec in ADAPTERS)],
            **{k: getattr(args, k) for k in ("requests", "concurrency", "input_len")},
            **{k: getattr(args, k) for k in ("output_len", "seed", "dtype")},
        },
        "rounds": rounds,
        "router_only_overhead_ms": stub,
    }
    print(
        f"\n{args.requests} requests, {args.input_len} in / {args.output_len} out, concurrency "
        f"{args.concurrency}, base + {len(ADAPTERS)} adapters; load average "
        f"{load_before[0]:.1f} -> {report['load_average_1m']['after']:.1f}"
    )
    print(f"{'round':<7}{'first':<8}{'direct tok/s':>13}{'router tok/s':>13}{'ratio':>8}")
    for index, r in enumerate(rounds, 1):
        direct, router = r["direct"]["output_throughput"], r["router"]["output_throughput"]
        print(f"{index:<7}{r['order'][0]:<8}{direct:>13.1f}{router:>13.1f}{r['ratio']:>8.3f}")
    for label in ("base", "adapter", "mixed"):
        if f"stub_{label}_added_ms_p50" in stub:
            print(
                f"router-only overhead, {label}: p50 {stub[f'stub_{label}_added_ms_p50']:.2f} ms, "
                f"p95 {stub[f'stub_{label}_added_ms_p95']:.2f} ms"
            )
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
