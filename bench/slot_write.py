"""Cost of one adapter slot write in loraplex's fused CPU LoRA path, without an engine.

When vLLM loads an adapter into a slot it writes that slot of every LoRA layer; the
fused kernel's wrapper must then bring each layer's weight layout up to date and
re-check whether the LM head's LoRA weights are all zero. This times that work for every
LoRA layer of the embedded base model (seven projections x its decoder layers), in one
process, three ways on the same tensors:

- at the write: what an adapter load runs now. vLLM's `activate_adapter` tells the
  wrapper before and after it writes (`before_slot_write` / `after_slot_write`), which
  copies that slot of every layer in one C++ call (`lpx_layout_slots`); the first step
  after only checks that each layer is current;
- recorded: the write is recorded but the layout is left to the first step after it,
  one Python call per layer copying that slot (the path before `lpx_layout_slots`, kept
  for layers that were not current before the write);
- unrecorded: the wrapper only sees the tensors' version counters move (every slot is
  copied and checked again).

Prints the per-write milliseconds, wall and process CPU (median of --writes), and their
ratio, and writes JSON.

Usage: python bench/slot_write.py [--max-loras 8] [--rank 16] [--dtype bfloat16]
       [--writes 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import machine

from loraplex.base_model import pull_embedded_model
from loraplex.serving.native_lora import LayerCall, kernel_path, load_kernel, use_bf16_pairs
from loraplex.serving.punica_cpu import FusedPunicaWrapperCPU


def stacked_layers(max_loras: int, rank: int, dtype: torch.dtype) -> list[tuple]:
    """(lora_a, lora_b) stacked like vLLM's for every LoRA layer of the base model."""
    config = json.loads((pull_embedded_model() / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = [(hidden, (hidden, kv, kv)), (hidden, (hidden,))]
    shapes += [(hidden, (inner, inner)), (inner, (hidden,))]
    layers = []
    for _ in range(config["num_hidden_layers"]):
        for in_size, widths in shapes:
            lora_a = tuple(torch.randn(max_loras, 1, rank, in_size).to(dtype) for _ in widths)
            lora_b = tuple(torch.randn(max_loras, 1, w, rank).to(dtype) for w in widths)
            layers.append((lora_a, lora_b))
    return layers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-loras", type=int, default=8, help="vLLM adapter slots")
    parser.add_argument("--rank", type=int, default=16, help="max LoRA rank")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype")
    parser.add_argument("--writes", type=int, default=9, help="slot writes timed per way")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/slot_write.json"), help="JSON results"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    kernel = load_kernel()
    if kernel is None:
        print("the fused kernel did not build", file=sys.stderr)
        return 1
    wrapper = FusedPunicaWrapperCPU(4096, 256, "cpu")
    layers = stacked_layers(args.max_loras, args.rank, dtype)
    lm_head_b = torch.zeros(args.max_loras, 1, 49152, args.rank, dtype=dtype)

    def step() -> tuple[float, float]:
        """The wrapper's work on the first step after a write: wall and process CPU ms
        (CPU time shows the work even when other processes hold the cores)."""
        started, cpu = time.perf_counter(), time.process_time()
        for lora_a, lora_b in layers:
            wrapper.native_weights(lora_a, lora_b, 1.0, dtype)
        wrapper._any_nonzero(lm_head_b)
        return 1000 * (time.perf_counter() - started), 1000 * (time.process_time() - cpu)

    def prepare_calls() -> None:
        """Each layer's kernel call prepared and current, as after a forward."""
        for lora_a, lora_b in layers:
            weights = wrapper.native_weights(lora_a, lora_b, 1.0, dtype)
            wrapper._calls[id(lora_b)] = LayerCall(weights, lora_a, lora_b, 1.0, dtype)

    step()  # first layout of every slot, not timed
    ways = ("at the write", "recorded", "unrecorded")
    times: dict[str, list[float]] = {way: [] for way in ways}
    cpu_times: dict[str, list[float]] = {way: [] for way in ways}
    for write in range(len(ways) * args.writes):
        way = ways[write % len(ways)]
        slot = write % args.max_loras
        if way == "at the write":
            prepare_calls()
            started, cpu = time.perf_counter(), time.process_time()
            before = wrapper.before_slot_write()
            before_ms = 1000 * (time.perf_counter() - started), 1000 * (time.process_time() - cpu)
        for lora_a, lora_b in layers:  # what vLLM's set_lora does to each layer
            for stacked in (*lora_a, *lora_b):
                stacked[slot].normal_()
        lm_head_b[slot].zero_()
        if way != "unrecorded":
            wrapper.slot_writes.record(slot)
        if way == "at the write":
            started, cpu = time.perf_counter(), time.process_time()
            wrapper.after_slot_write(slot, before)
            at_write = 1000 * (time.perf_counter() - started), 1000 * (time.process_time() - cpu)
            wall, cpu = step()
            wall, cpu = wall + before_ms[0] + at_write[0], cpu + before_ms[1] + at_write[1]
        else:
            wall, cpu = step()
        times[way].append(wall)
        cpu_times[way].append(cpu)
    medians = {way: statistics.median(values) for way, values in times.items()}
    cpu_medians = {way: statistics.median(values) for way, values in cpu_times.items()}
    lora_a = layers[0][0]
    results = {
        "settings": vars(args) | {"out": str(args.out), "lora_layers": len(layers)},
        "machine": machine()
        | {
            "lora_kernel_path": kernel_path(dtype, lora_a[0].shape[-1], args.rank, (576,)),
            "bf16_pairs": use_bf16_pairs(kernel, dtype, lora_a),
            "threads": torch.get_num_threads(),
        },
        "ms_per_write": times,
        "cpu_ms_per_write": cpu_times,
        "median_ms": medians,
        "median_cpu_ms": cpu_medians,
        "ratio_unrecorded_to_recorded": medians["unrecorded"] / medians["recorded"],
        "cpu_ratio_unrecorded_to_recorded": cpu_medians["unrecorded"] / cpu_medians["recorded"],
        "ratio_recorded_to_at_the_write": medians["recorded"] / medians["at the write"],
        "cpu_ratio_recorded_to_at_the_write": (
            cpu_medians["recorded"] / cpu_medians["at the write"]
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"{len(layers)} LoRA layers, max_loras {args.max_loras}, r={args.rank}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, {results['machine']['cpu_model']}"
    )
    for way, values in times.items():
        runs = ", ".join(f"{value:.1f}" for value in values)
        print(
            f"{way:>12}: median {medians[way]:.1f} ms wall, {cpu_medians[way]:.1f} ms CPU "
            f"per write (wall: {runs})"
        )
    print(
        f"unrecorded / recorded: {results['ratio_unrecorded_to_recorded']:.1f}x wall, "
        f"{results['cpu_ratio_unrecorded_to_recorded']:.1f}x CPU; recorded / at the write: "
        f"{results['ratio_recorded_to_at_the_write']:.1f}x wall, "
        f"{results['cpu_ratio_recorded_to_at_the_write']:.1f}x CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
