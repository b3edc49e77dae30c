"""Where a cold adapter load's time goes, inside one vLLM engine, per kernel choice.

For each --kernels choice (LORAPLEX_CPU_LORA_KERNELS) a child process runs one engine
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so its parts can be timed from here) with
--slots adapter slots, fills them with warm-up adapters, then sends --adapters adapters
it has never seen, one 1-token request each, then the same request again (warm). Timers
wrap, per request:

- read + build: vLLM reading the adapter's safetensors and converting it to the model's
  dtype (`WorkerLoRAManager._load_adapter`);
- slot write: vLLM writing the adapter into a slot of every LoRA layer (its own
  `LoRAModelManager.activate_adapter`, without what loraplex adds around it:)
- layout at the write: loraplex copying that slot into the fused kernel's layout
  (`before_slot_write` + `after_slot_write`, one C++ call for every layer);
- layout on the forward: re-laying out layers on the first forward after a load
  (`FusedPunicaWrapperCPU._layer_call`: none after a write vLLM made, 120 calls before);
- LM-head/embedding checks: whether the written slot's LM-head and embedding LoRA weights
  are zero (vLLM's ops for them are skipped while they are);
- request: the whole `generate` call, and minor page faults of the process during it.

Prints the median ms of each part, cold and warm, per kernel choice, and writes JSON with
the machine. The "read + build" row is vLLM's own code, the same for every choice: on a
virtual machine it is dominated by the first touch of the memory the new adapter's
tensors take (see bench/RESULTS.md), so compare choices within one run.

Usage: python bench/cold_load_split.py [--adapters 16] [--slots 8] [--cpu-slots 32]
       [--kernels vllm loraplex]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench_common import machine, write_report

PROMPT = "Describe a busy market in the morning."
PARTS = {
    "read + build": ("vllm.lora.worker_manager", "WorkerLoRAManager", "_load_adapter"),
    "slot write": ("vllm.lora.model_manager", "LoRAModelManager", "activate_adapter"),
    "layout at the write": (
        "loraplex.serving.punica_cpu",
        "FusedPunicaWrapperCPU",
        ("before_slot_write", "after_slot_write"),
    ),
    "layout on the forward": (
        "loraplex.serving.punica_cpu",
        "FusedPunicaWrapperCPU",
        "_layer_call",
    ),
    "lm-head/embedding checks": (
        "loraplex.serving.punica_cpu",
        "GroupedPunicaWrapperCPU",
        ("add_lora_logits", "add_lora_embedding"),
    ),
}


def install_timers(seconds: dict[str, float]) -> None:
    """Wrap each part's methods so that their time adds up into `seconds[part]`."""
    import importlib

    for part, (module_name, owner_name, names) in PARTS.items():
        owner = getattr(importlib.import_module(module_name), owner_name)
        for name in (names,) if isinstance(names, str) else names:
            original = owner.__dict__.get(name)
            if original is None:  # a method this code does not have (older code)
                continue

            def timed(*args: Any, _original=original, _part=part, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    seconds[_part] += time.perf_counter() - started

            setattr(owner, name, timed)


def child(args: argparse.Namespace) -> dict:
    """One engine with this process's kernel choice: median ms per part, cold and warm."""
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_PLUGINS="loraplex")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from decode_split import adapter_dirs
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraplex.base_model import embedded_model_dir

    seconds: dict[str, float] = defaultdict(float)
    install_timers(seconds)
    adapters = [str(path) for path in adapter_dirs(args.slots + args.adapters, 16)]
    llm = LLM(
        model=str(embedded_model_dir()),
        dtype="bfloat16",
        enable_lora=True,
        max_loras=args.slots,
        max_cpu_loras=args.cpu_slots,
        max_lora_rank=16,
        max_model_len=512,
        max_num_seqs=16,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=1)

    def request(index: int) -> dict[str, float]:
        seconds.clear()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        lora = LoRARequest(f"a{index}", index + 1, adapters[index])
        llm.generate([PROMPT], params, lora_request=lora, use_tqdm=False)
        parts = {part: 1000 * seconds.get(part, 0.0) for part in PARTS}
        parts["request"] = 1000 * (time.perf_counter() - started)
        parts["page faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return parts

    for index in range(args.slots):  # every slot holds an adapter: loads evict
        request(index)
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for index in range(args.slots, args.slots + args.adapters):
        runs["cold"].append(request(index))
        runs["warm"].append(request(index))
    return {
        kind: {name: statistics.median(run[name] for run in samples) for name in samples[0]}
        for kind, samples in runs.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=16, help="cold adapters timed")
    parser.add_argument("--slots", type=int, default=8, help="vLLM adapter slots (max_loras)")
    parser.add_argument("--cpu-slots", type=int, default=32, help="vLLM CPU adapter cache")
    parser.add_argument("--kernels", nargs="+", default=["vllm", "loraplex"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/cold_load_split.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0

    results = {}
    for kernels in args.kernels:
        command = [sys.executable, __file__, "--child", "--adapters", str(args.adapters)]
        command += ["--slots", str(args.slots), "--cpu-slots", str(args.cpu_slots)]
        env = os.environ | {"LORAPLEX_CPU_LORA_KERNELS": kernels}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results[kernels] = json.loads(done.stdout.strip().splitlines()[-1])

    names = [*PARTS, "request", "page faults"]
    print(
        f"\nmedian ms per request ({args.adapters} adapters, r=16 on 7 projections, bf16, "
        f"{args.slots} slots, CPU cache {args.cpu_slots}): cold (first request) / warm"
    )
    print(f"{'part':<26}" + "".join(f"{kernels:>20}" for kernels in results))
    for name in names:
        cells = [f"{row['cold'][name]:.2f} / {row['warm'][name]:.2f}" for row in results.values()]
        print(f"{name:<26}" + "".join(f"{cell:>20}" for cell in cells))
    added = [f"{row['cold']['request'] - row['warm']['request']:.2f}" for row in results.values()]
    print(f"{'cold - warm request':<26}" + "".join(f"{cell:>20}" for cell in added))
    write_report(
        {"machine": machine(), "workload": vars(args) | {"out": str(args.out)}, "rows": results},
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
