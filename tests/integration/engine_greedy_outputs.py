"""Run in a child process: greedy outputs of one vLLM engine for a mixed-adapter batch.

Usage: python engine_greedy_outputs.py OUT.json MAX_LORAS ADAPTER_DIR...
The kernel choice comes from LORAPLEX_CPU_LORA_KERNELS in the environment.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

PROMPTS = [
    "Write one sentence about the ocean.",
    "List three fruits.",
    "Explain what a CPU does.",
    "Describe a cat.",
]
TOKENS = 24


def main() -> None:
    # loraplex's own lines (which CPU LoRA kernel loaded, which slots were re-laid out)
    # on stderr, for the test to check.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    logging.getLogger("loraplex").setLevel(logging.DEBUG)
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraplex.base_model import embedded_model_dir

    out, max_loras, adapters = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    llm = LLM(
        model=str(embedded_model_dir()),
        dtype="float32",
        enable_lora=True,
        max_loras=max_loras,
        max_lora_rank=16,
        max_model_len=512,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=TOKENS)
    loras: list[LoRARequest | None] = [None] + [
        LoRARequest(Path(path).name, index + 1, path) for index, path in enumerate(adapters)
    ]
    # Every prompt for the base model and each adapter, all in one batch.
    jobs = [(prompt, lora) for prompt in PROMPTS for lora in loras]
    mixed = llm.generate([p for p, _ in jobs], params, lora_request=[lo for _, lo in jobs])
    base_alone = llm.generate(PROMPTS, params)
    out.write_text(
        json.dumps(
            {
                "mixed": [
                    {
                        "adapter": lo.lora_name if lo else None,
                        "tokens": list(o.outputs[0].token_ids),
                    }
                    for (_, lo), o in zip(jobs, mixed, strict=True)
                ],
                "base_alone": [list(o.outputs[0].token_ids) for o in base_alone],
            }
        )
    )


if __name__ == "__main__":
    main()
