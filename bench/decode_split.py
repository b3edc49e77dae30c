"""Where a decode step's time goes with multi-LoRA on CPU: the fused LoRA kernel, the rest
of the LoRA bookkeeping, and the base model.

One vLLM engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so its model runner
can be timed from here) with loraplex's CPU LoRA ops, and generates the same prompts three
times: base model only, uniform over 8 adapters, all on 1 adapter. Timers wrap, per step:

- step: the model runner's `execute_model` + `sample_tokens` (one engine step);
- lora mapping: vLLM's `set_active_loras` (the batch's adapter mapping, slot activation and
  the punica wrapper's `update_metadata`, where loraplex groups tokens into tiles);
- fused kernel: the C++ call that adds every adapter's delta to one layer's output
  (`NativeKernel.run`);
- lora weights: preparing a layer's kernel call (`_layer_call`: support checks, weight
  layout, re-layout after a slot write), on a layer's first step and after a write only;
- lora glue: the rest of `add_lora_linear` (the prepared call's validity check
  `LayerCall.current` with the weights' version counters, x and y into the call, dispatch);
- lm-head/embedding: the checks that skip vLLM's LoRA on those while their weights are zero;
- base model: what is left: base GEMMs, attention, norms, sampling, input preparation.

Only decode steps (one scheduled token per request) are counted. The timers' own cost is
a few microseconds per call (~240 calls per step for this model), shown as a row of its
own, measured by timing an empty timed call.

Usage: python bench/decode_split.py [--prompts 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import machine, write_report

ROWS = ("base", "uniform-8", "single-1")
PARTS = ("lora mapping", "fused kernel", "lora weights", "lora glue", "lm-head/embedding")


class StepTimers:
    """Seconds per named part, accumulated over the current step and kept per decode step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.calls = 0
        self.steps: list[dict[str, float]] = []
        self.decode = False

    def wrap(self, owner: type, name: str, part: str) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.current[part] += time.perf_counter() - started
                timers.calls += 1

        setattr(owner, name, timed)

    def start_step(self, scheduler_output: Any) -> None:
        self.current = defaultdict(float)
        self.calls = 0
        scheduled = scheduler_output.num_scheduled_tokens
        self.decode = bool(scheduled) and scheduler_output.total_num_scheduled_tokens == len(
            scheduled
        )

    def end_step(self, seconds: float) -> None:
        if self.decode:
            self.steps.append(dict(self.current) | {"step": seconds, "calls": self.calls})


def install_timers(timers: StepTimers) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    from loraplex.serving.native_lora import NativeKernel
    from loraplex.serving.punica_cpu import FusedPunicaWrapperCPU, GroupedPunicaWrapperCPU

    execute, sample = GPUModelRunner.execute_model, GPUModelRunner.sample_tokens
    started = [0.0]

    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        timers.start_step(scheduler_output)
        started[0] = time.perf_counter()
        result = execute(self, scheduler_output, *args, **kwargs)
        if result is not None:  # a step that samples nothing (no sample_tokens call)
            timers.end_step(time.perf_counter() - started[0])
        return result

    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = sample(self, *args, **kwargs)
        timers.end_step(time.perf_counter() - started[0])
        return result

    GPUModelRunner.execute_model = execute_model  # type: ignore[method-assign]
    GPUModelRunner.sample_tokens = sample_tokens  # type: ignore[method-assign]
    timers.wrap(LoRAModelRunnerMixin, "set_active_loras", "lora mapping")
    timers.wrap(NativeKernel, "run", "fused kernel")
    timers.wrap(FusedPunicaWrapperCPU, "_layer_call", "lora weights")
    # Wrapped last so that it encloses the two above; the glue is its total minus theirs.
    timers.wrap(FusedPunicaWrapperCPU, "add_lora_linear", "add_lora_linear")
    timers.wrap(GroupedPunicaWrapperCPU, "add_lora_logits", "lm-head/embedding")
    timers.wrap(GroupedPunicaWrapperCPU, "add_lora_embedding", "lm-head/embedding")


def timer_cost_s() -> float:
    """What one timed call adds: an empty function timed like the wrapped ones."""

    class Probe:
        def call(self) -> None:
            return None

    probe_timers = StepTimers()
    probe_timers.wrap(Probe, "call", "probe")
    probe, calls = Probe(), 20_000
    started = time.perf_counter()
    for _ in range(calls):
        probe.call()
    timed = (time.perf_counter() - started) / calls
    plain: Callable[[], None] = lambda: None  # noqa: E731
    started = time.perf_counter()
    for _ in range(calls):
        plain()
    return max(0.0, timed - (time.perf_counter() - started) / calls)


def split(steps: list[dict[str, float]], timer_cost: float) -> dict[str, float]:
    """Median ms per decode step of each part (glue = add_lora_linear minus what it encloses)."""

    def median_ms(values: list[float]) -> float:
        return statistics.median(values) * 1000 if values else 0.0

    parts: dict[str, list[float]] = defaultdict(list)
    for step in steps:
        linear = step.get("add_lora_linear", 0.0)
        glue = linear - step.get("fused kernel", 0.0) - step.get("lora weights", 0.0)
        overhead = step["calls"] * timer_cost
        lora = sum(step.get(p, 0.0) for p in PARTS if p != "lora glue") + glue
        values = {p: step.get(p, 0.0) for p in PARTS} | {"lora glue": glue}
        values |= {"timers": overhead, "base model": step["step"] - lora - overhead}
        values["step"] = step["step"]
        for name, value in values.items():
            parts[name].append(value)
    return {name: median_ms(values) for name, values in parts.items()} | {"steps": len(steps)}


def adapter_dirs(count: int, rank: int) -> list[Path]:
    from loraplex.base_model import pull_embedded_model
    from loraplex.training.demo_adapters import DemoAdapterSpec, ensure_demo_adapters

    root = Path.home() / ".cache" / "loraplex" / "bench-multilora"
    specs = [DemoAdapterSpec(f"bench/r{rank}-{i:02d}", rank, 100 + i, 0.4) for i in range(count)]
    return ensure_demo_adapters(pull_embedded_model(), root, specs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="requests per row (one batch)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per request")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_split.json"))
    args = parser.parse_args()

    os.environ.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_PLUGINS="loraplex",
        # The fused kernel, the default: the timers wrap its wrapper's methods.
        LORAPLEX_CPU_LORA_KERNELS="loraplex",
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraplex.base_model import embedded_model_dir

    adapters = [str(p) for p in adapter_dirs(8, args.rank)]
    timers = StepTimers()
    install_timers(timers)
    llm = LLM(
        model=str(embedded_model_dir()),
        dtype=args.dtype,
        enable_lora=True,
        max_loras=8,
        max_cpu_loras=8,
        max_lora_rank=args.rank,
        max_model_len=1024,
        max_num_seqs=args.prompts,
        seed=0,
    )
    texts = [f"Write a few sentences about topic number {i}." for i in range(args.prompts)]

    def lora(index: int) -> LoRARequest:
        return LoRARequest(Path(adapters[index]).name, index + 1, adapters[index])

    requests: dict[str, list[LoRARequest | None]] = {
        "base": [None] * args.prompts,
        "uniform-8": [lora(i % 8) for i in range(args.prompts)],
        "single-1": [lora(0)] * args.prompts,
    }
    # Warm-up: every adapter loaded into a slot, so rows time decoding, not loads.
    warm = [f"Warm-up {i}." for i in range(8)]
    llm.generate(warm, SamplingParams(max_tokens=2), lora_request=[lora(i) for i in range(8)])
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    cost = timer_cost_s()
    rows = {}
    for row in ROWS:
        timers.steps = []
        llm.generate(texts, params, lora_request=requests[row], use_tqdm=False)
        rows[row] = split(timers.steps, cost)

    names = ["step", *PARTS, "timers", "base model"]
    print(
        f"\nms per decode step (median over decode steps), {args.prompts} requests x "
        f"{args.tokens} tokens, {args.dtype}, r={args.rank} on 7 projections, "
        "fused kernel (loraplex)"
    )
    print(f"{'part':<20}" + "".join(f"{row:>12}" for row in ROWS))
    for name in names:
        print(f"{name:<20}" + "".join(f"{rows[row][name]:>12.2f}" for row in ROWS))
    print(f"{'decode steps':<20}" + "".join(f"{rows[row]['steps']:>12}" for row in ROWS))
    write_report(
        {"machine": machine(), "workload": vars(args) | {"out": str(args.out)}, "rows": rows},
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
