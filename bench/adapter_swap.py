"""Adapter hot-swap: cold vs warm first-request latency, and throughput with many adapters.

Starts one `loraplex serve` (vLLM backend + router) with its own registry in a temp
folder, publishes N seeded r=16 adapters of the embedded base (local store), then:

- cold vs warm: for K adapters never requested before (in the store, not in the cache,
  not in the engine), the latency of the first 1-token request, then of the same
  request again; p50/p95 of cold, warm and their difference (fetch + hash verification
  + registration + the engine's load).
- throughput: R requests x T output tokens at concurrency C with a power-law
  popularity (p_i ~ 1 / i^alpha) over all N adapters, vs uniform over 8 adapters.

With several --kernels (LORAPLEX_CPU_LORA_KERNELS) the same published adapters are
measured with one server per choice, back to back, each with an empty router cache.
The JSON also records the machine (CPU model, ISA flags) and the path the fused kernel
takes for each LoRA projection of the base model on it.

Prints a Markdown table and writes JSON (--out). Do not run it while others share the
machine: it saturates the CPUs for minutes.

Usage: python bench/adapter_swap.py [--adapters 200] [--cold 20] [--requests 256]
       [--tokens 32] [--concurrency 16] [--alpha 0.5] [--max-loras 8] [--max-cpu-loras 32]
       [--kernels vllm loraplex-torch loraplex]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from bench_common import free_port, machine, percentile, serve_command, wait_ready
from safetensors.torch import load_file, save_file

from loraplex.adapters.blob_store import open_blob_store
from loraplex.adapters.catalog import Catalog
from loraplex.adapters.publish import PublishChecks, publish_adapter
from loraplex.adapters.refs import parse_registry_name
from loraplex.base_model import pull_embedded_model
from loraplex.training.demo_adapters import DemoAdapterSpec, build_demo_adapter

RANK, STRENGTH = 16, 0.4
KERNELS = ("vllm", "loraplex-torch", "loraplex")
PROMPT = "Describe a busy market in the morning."


def seeded_variant(template: Path, out: Path, seed: int) -> Path:
    tensors = load_file(str(template / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(tensors):
        shape = tensors[name].shape
        scale = 1 / shape[1] ** 0.5 if "lora_A" in name else STRENGTH / RANK**0.5
        weights[name] = torch.randn(shape, generator=generator) * scale
    out.mkdir(parents=True)
    save_file(weights, str(out / "adapter_model.safetensors"))
    shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
    return out


def publish_fleet(work: Path, env: dict[str, str], count: int) -> list[str]:
    base = pull_embedded_model()
    template = build_demo_adapter(
        base, DemoAdapterSpec("bench/template", RANK, 1000, STRENGTH), work / "template"
    )
    catalog = Catalog.open(env["LORAPLEX_DATABASE_URL"])
    store = open_blob_store(env["LORAPLEX_REGISTRY_STORE"])
    checks = PublishChecks(max_lora_rank=RANK, max_bytes=1 << 30)
    names = []
    for i in range(count):
        name = f"bench/adapter-{i:04d}"
        source = seeded_variant(template, work / "src" / str(i), seed=i + 1)
        publish_adapter(
            source, parse_registry_name(name), catalog=catalog, store=store, checks=checks
        )
        shutil.rmtree(source)
        names.append(name)
    return names


def timed_request(client: httpx.Client, model: str, tokens: int = 1) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    started = time.perf_counter()
    response = client.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


async def throughput(url: str, models: list[str], args: argparse.Namespace) -> dict:
    semaphore = asyncio.Semaphore(args.concurrency)
    tokens = 0

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(model: str) -> None:
            nonlocal tokens
            body = {
                "model": model,
                "prompt": PROMPT,
                "max_tokens": args.tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            async with semaphore:
                response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one(m) for m in models))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(models),
        "seconds": round(elapsed, 2),
        "output_tok_s": round(tokens / elapsed, 1),
        "distinct_adapters": len(set(models)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=200, help="adapters published")
    parser.add_argument(
        "--cold", type=int, default=20, help="adapters timed cold then warm (the last ones)"
    )
    parser.add_argument(
        "--requests", type=int, default=256, help="requests per throughput workload"
    )
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--alpha", type=float, default=0.5, help="power-law exponent")
    parser.add_argument("--max-loras", type=int, default=8, help="vLLM adapter slots")
    parser.add_argument("--max-cpu-loras", type=int, default=32, help="vLLM CPU adapter cache")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype")
    parser.add_argument(
        "--kernels",
        choices=KERNELS,
        nargs="+",
        default=["loraplex"],
        help="CPU LoRA kernel choices to measure, one server each, back to back",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/adapter_swap.json"),
        help="JSON results",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-swap-"))
    env = dict(
        os.environ,
        LORAPLEX_DATABASE_URL=f"sqlite:///{work}/loraplex.db",
        LORAPLEX_REGISTRY_STORE=str(work / "store"),
    )
    try:
        print(f"publishing {args.adapters} adapters (r={RANK}) into {work}", file=sys.stderr)
        names = publish_fleet(work, env, args.adapters)
        # Every choice reads the store from the page cache, not only the ones after the first.
        for blob in (work / "store").rglob("*"):
            if blob.is_file():
                blob.read_bytes()
        runs = {}
        for kernels in args.kernels:
            print(f"measuring with {kernels} kernels ...", file=sys.stderr)
            cache = work / f"cache-{kernels}"  # empty: every cold adapter is fetched
            kernel_env = env | {
                "LORAPLEX_REGISTRY_CACHE_DIR": str(cache),
                "LORAPLEX_CPU_LORA_KERNELS": kernels,
            }
            runs[kernels] = serve_and_measure(kernel_env, names, args)
            if runs[kernels] is None:
                return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {
        "settings": vars(args) | {"out": str(args.out)},
        "machine": machine() | {"lora_kernel_paths": kernel_paths(args.dtype)},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def kernel_paths(dtype: str) -> dict[str, str]:
    """The path loraplex's fused kernel takes for each LoRA projection of the base model
    on this machine (same build and the same checks as in the engine)."""
    from loraplex.serving.native_lora import kernel_path

    config = json.loads((pull_embedded_model() / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    kv = hidden // heads * kv_heads
    projections = {
        "qkv_proj": (hidden, (hidden, kv, kv)),
        "o_proj": (hidden, (hidden,)),
        "gate_up_proj": (hidden, (inner, inner)),
        "down_proj": (inner, (hidden,)),
    }
    torch_dtype = getattr(torch, dtype)
    return {
        name: kernel_path(torch_dtype, in_size, RANK, widths)
        for name, (in_size, widths) in projections.items()
    }


def serve_and_measure(
    env: dict[str, str], names: list[str], args: argparse.Namespace
) -> dict | None:
    """One `loraplex serve` with `env`, measured; None if it did not start."""
    port, backend_port = free_port(), free_port()
    command = serve_command(
        port,
        "--backend-port",
        str(backend_port),
        "--dtype",
        args.dtype,
        "--max-loras",
        str(args.max_loras),
        "--max-cpu-loras",
        str(args.max_cpu_loras),
        "--log-level",
        "warning",
    )
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(url, process):
            print("loraplex serve did not become ready", file=sys.stderr)
            return None
        return run_measurements(url, names, args)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def run_measurements(url: str, names: list[str], args: argparse.Namespace) -> dict:
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(3):  # warm the engine (base model path) first
            timed_request(client, "SmolLM2-135M-Instruct")
        cold_names = names[-args.cold :]
        cold, warm = [], []
        for name in cold_names:
            cold.append(timed_request(client, name))
            warm.append(timed_request(client, name))
    added = [c - w for c, w in zip(cold, warm, strict=True)]
    rng = random.Random(0)
    weights = [1 / (i + 1) ** args.alpha for i in range(len(names))]
    skewed = rng.choices(names, weights=weights, k=args.requests)
    uniform = [names[i % 8] for i in range(args.requests)]
    rng.shuffle(uniform)
    ms = lambda values, q: round(1000 * percentile(values, q), 1)  # noqa: E731
    return {
        "cold_ms": {"p50": ms(cold, 0.5), "p95": ms(cold, 0.95)},
        "warm_ms": {"p50": ms(warm, 0.5), "p95": ms(warm, 0.95)},
        "cold_added_ms": {"p50": ms(added, 0.5), "p95": ms(added, 0.95)},
        "uniform_8": asyncio.run(throughput(url, uniform, args)),
        f"power_law_{len(names)}": asyncio.run(throughput(url, skewed, args)),
    }


def print_table(results: dict) -> None:
    info = results["machine"]
    print(f"{info['cpu_model']}, {info['cpu_count']} CPUs, {' '.join(info['isa_flags'])}")
    print(f"fused kernel paths: {info['lora_kernel_paths']}\n")
    workloads = [
        key
        for key, value in next(iter(results["runs"].values())).items()
        if isinstance(value, dict) and "output_tok_s" in value
    ]
    print(
        "| kernels | cold p50 / p95 ms | warm p50 / p95 ms | cold added p50 / p95 ms | "
        + " | ".join(f"{key} tok/s" for key in workloads)
        + " |"
    )
    print("|---|---|---|---|" + "---:|" * len(workloads))
    for kernels, run in results["runs"].items():
        latencies = [f"{run[key]['p50']} / {run[key]['p95']}" for key in ("cold_ms", "warm_ms")]
        added = f"**{run['cold_added_ms']['p50']}** / {run['cold_added_ms']['p95']}"
        tok_s = [str(run[key]["output_tok_s"]) for key in workloads]
        print(f"| `{kernels}` | " + " | ".join([*latencies, added, *tok_s]) + " |")


if __name__ == "__main__":
    sys.exit(main())
