"""Multi-LoRA throughput on one vLLM engine: vLLM's CPU LoRA ops vs loraplex's grouped ops.

For each kernel choice (LORAPLEX_CPU_LORA_KERNELS = vllm | loraplex-torch | loraplex)
one engine is started in a child process and runs the same prompts in four rows:

- base only;
- uniform over 8 adapters;
- all on 1 adapter;
- uniform over 32 adapters (more than max_loras: slots are swapped during the run).

Rows are interleaved and repeated (--repeats, median reported) so that a slow spell of
the machine does not skew one ratio. Prints output tokens/s and the ratio to the base
row of the same engine, plus, for
each of loraplex's choices, the speedup over vLLM's ops and the share of requests
whose tokens equal vLLM's; writes JSON and a bar chart.

With several `--max-loras` values, each kernel choice runs once per value (a slot costs
memory on CPU, not a kernel launch: the 32-adapter row shows what more slots buy), and
every column is named `KERNELS@max_loras`.

Usage: python bench/multilora_throughput.py [--prompts 64] [--tokens 64] [--dtype bfloat16]
                                           [--repeats 3] [--kernels vllm loraplex]
                                           [--max-loras 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_common import machine

ROWS = ("base", "uniform-8", "single-1", "uniform-32")
KERNELS = ("vllm", "loraplex-torch", "loraplex")
TOPICS = [
    "the sea",
    "a city at night",
    "old trains",
    "mountains",
    "a library",
    "coffee",
    "winter",
    "robots",
    "a garden",
    "the moon",
    "rivers",
    "music",
]


def prompts(count: int) -> list[str]:
    return [f"Write a few sentences about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(count)]


def adapter_dirs(count: int, rank: int) -> list[Path]:
    from loraplex.base_model import pull_embedded_model
    from loraplex.training.demo_adapters import DemoAdapterSpec, ensure_demo_adapters

    base = pull_embedded_model()
    root = Path.home() / ".cache" / "loraplex" / "bench-multilora"
    specs = [DemoAdapterSpec(f"bench/r{rank}-{i:02d}", rank, 100 + i, 0.4) for i in range(count)]
    return ensure_demo_adapters(base, root, specs)


def run_engine(args: argparse.Namespace) -> None:
    """Child process: one engine, every row, results as JSON into `args.out`."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraplex.base_model import embedded_model_dir

    adapters = [str(p) for p in adapter_dirs(32, args.rank)]
    llm = LLM(
        model=str(embedded_model_dir()),
        dtype=args.dtype,
        enable_lora=True,
        max_loras=args.max_loras[0],
        max_cpu_loras=max(32, args.max_loras[0]),
        max_lora_rank=args.rank,
        max_model_len=1024,
        max_num_seqs=args.prompts,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    texts = prompts(args.prompts)
    requests = {
        "base": [None] * len(texts),
        "uniform-8": [adapters[i % 8] for i in range(len(texts))],
        "single-1": [adapters[0]] * len(texts),
        "uniform-32": [adapters[i % 32] for i in range(len(texts))],
    }
    ids = {path: index + 1 for index, path in enumerate(adapters)}

    def lora(path: str | None) -> LoRARequest | None:
        return None if path is None else LoRARequest(Path(path).name, ids[path], path)

    # Warm-up: loads every adapter into the CPU cache so rows time decoding only.
    warm_texts = [texts[i % len(texts)] for i in range(len(adapters))]
    llm.generate(warm_texts, SamplingParams(max_tokens=2), lora_request=[lora(a) for a in adapters])
    # Rows interleaved, each run `repeats` times: a slow spell of the machine then hits
    # every row instead of skewing one ratio; each row reports its median run.
    runs: dict[str, list[dict]] = {row: [] for row in ROWS}
    for _ in range(args.repeats):
        for row in ROWS:
            loras = [lora(path) for path in requests[row]]
            started = time.perf_counter()
            outputs = llm.generate(texts, params, lora_request=loras, use_tqdm=False)
            elapsed = time.perf_counter() - started
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            runs[row].append(
                {
                    "tok_s": tokens / elapsed,
                    "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                }
            )
    results = {}
    for row in ROWS:
        median = sorted(runs[row], key=lambda run: run["tok_s"])[len(runs[row]) // 2]
        results[row] = median | {"all_tok_s": [run["tok_s"] for run in runs[row]]}
    args.out.write_text(json.dumps(results))


def engine_label(kernels: str, max_loras: int, all_max_loras: list[int]) -> str:
    """A column's name: the kernel choice, plus the slot count when several are compared."""
    return kernels if len(all_max_loras) == 1 else f"{kernels}@{max_loras}"


def plot(summary: dict, kernels: list[str], path: Path) -> None:
    """Bar chart of each row's throughput relative to its engine's base row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(kernels)
    for index, name in enumerate(kernels):
        ratios = [summary[row][name]["ratio_to_base"] for row in ROWS]
        xs = [i + index * width for i in range(len(ROWS))]
        bars = ax.bar(xs, ratios, width, label=f"{name} CPU LoRA ops")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(0.85, color="grey", linestyle="--", linewidth=1, label="target 0.85")
    ax.set_xticks([i + width * (len(kernels) - 1) / 2 for i in range(len(ROWS))], ROWS)
    ax.set_ylabel("output tok/s / base tok/s")
    ax.set_ylim(0, 1.15)
    # Below the axes: inside, it covers the bars' labels.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(kernels) + 1)
    ax.set_title("Multi-LoRA throughput on CPU, relative to the base model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each row (interleaved); median reported"
    )
    parser.add_argument("--kernels", choices=KERNELS, nargs="+", default=list(KERNELS))
    parser.add_argument(
        "--max-loras",
        type=int,
        nargs="+",
        default=[8],
        help="vLLM adapter slots; one engine per kernel choice and value (default 8)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/multilora_throughput.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_engine(args)
        return 0

    adapter_dirs(32, args.rank)  # build once, before the timed children
    results = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".engine.json")
    engines = [(k, m) for m in args.max_loras for k in args.kernels]
    labels = [engine_label(k, m, args.max_loras) for k, m in engines]
    for (kernels, max_loras), label in zip(engines, labels, strict=True):
        env = dict(os.environ, LORAPLEX_CPU_LORA_KERNELS=kernels, VLLM_PLUGINS="loraplex")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        child = [
            sys.executable,
            __file__,
            "--child",
            "--prompts",
            str(args.prompts),
            "--tokens",
            str(args.tokens),
            "--rank",
            str(args.rank),
            "--dtype",
            args.dtype,
            "--repeats",
            str(args.repeats),
            "--max-loras",
            str(max_loras),
            "--out",
            str(partial),
        ]
        print(f"running engine with {kernels} kernels, max_loras {max_loras} ...", file=sys.stderr)
        done = subprocess.run(
            child,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        results[label] = json.loads(partial.read_text())

    print(
        f"\n{args.prompts} prompts x {args.tokens} greedy tokens (ignore_eos), {args.dtype}, "
        f"r={args.rank} on 7 projections, max_loras {'/'.join(map(str, args.max_loras))}, "
        f"max_cpu_loras {max(32, *args.max_loras)}, "
        f"median of {args.repeats} runs per row"
    )
    header = f"{'row':<12}" + "".join(f"{k + ' tok/s':>22}{'ratio':>7}" for k in labels)
    reference, others = labels[0], labels[1:]
    print(header + "".join(f"{'x ' + reference + ' (' + k + ')':>26}{'same':>8}" for k in others))
    summary = {}
    for row in ROWS:
        line = f"{row:<12}"
        summary[row] = {}
        for kernels in labels:
            tok_s = results[kernels][row]["tok_s"]
            ratio = tok_s / results[kernels]["base"]["tok_s"]
            summary[row][kernels] = {
                "tok_s": tok_s,
                "ratio_to_base": ratio,
                "all_tok_s": results[kernels][row]["all_tok_s"],
            }
            line += f"{tok_s:>22.1f}{ratio:>7.2f}"
        old = results[reference][row]
        for kernels in others:
            new = results[kernels][row]
            speedup = new["tok_s"] / old["tok_s"]
            same = sum(a == b for a, b in zip(old["token_ids"], new["token_ids"], strict=True))
            summary[row][kernels] |= {
                f"speedup_vs_{reference}": speedup,
                f"same_tokens_as_{reference}": same / len(old["token_ids"]),
            }
            line += f"{speedup:>26.2f}{same:>5}/{len(old['token_ids'])}"
        print(line)
    partial.unlink()
    plot(summary, labels, args.out.with_suffix(".png"))
    report = {
        "machine": machine(),
        "workload": vars(args) | {"out": str(args.out)},
        "rows": summary,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
