"""With loraplex's CPU multi-LoRA ops on (fused kernel, or grouped torch ops), a real
engine answers exactly as with vLLM's ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.base_model import pull_embedded_model
from loraplex.training.demo_adapters import DEMO_ADAPTERS, ensure_demo_adapters

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("engine_greedy_outputs.py")


def engine_outputs(
    kernels: str, max_loras: int, adapters: list[Path], out: Path, log: list[str] | None = None
) -> dict:
    env = dict(
        os.environ,
        LORAPLEX_CPU_LORA_KERNELS=kernels,
        VLLM_PLUGINS="loraplex",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the model in this process: its logs on stderr
    )
    command = [sys.executable, str(SCRIPT), str(out), str(max_loras), *map(str, adapters)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # The fused kernel really ran: no silent fallback to the torch ops.
    assert ("fused CPU LoRA kernel loaded" in done.stderr) == (kernels == "loraplex")
    if log is not None:
        log.append(done.stderr)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("kernel-adapters")
    return ensure_demo_adapters(pull_embedded_model(), root)


@pytest.fixture(scope="module")
def vllm_outputs(adapters, tmp_path_factory: pytest.TempPathFactory) -> dict:
    # max_loras 4 leaves the last slot empty, where vLLM's ops read base tokens' LoRA.
    return engine_outputs("vllm", 4, adapters, tmp_path_factory.mktemp("vllm") / "out.json")


@pytest.mark.parametrize("kernels", ["loraplex", "loraplex-torch"])
def test_loraplex_kernels_equal_vllm_kernels_token_for_token(
    kernels, adapters, vllm_outputs, tmp_path
) -> None:
    ours = engine_outputs(kernels, 4, adapters, tmp_path / "ours.json")
    assert ours["mixed"] == vllm_outputs["mixed"]
    by_adapter: dict[str | None, set] = {}
    for row in ours["mixed"]:
        by_adapter.setdefault(row["adapter"], set()).add(tuple(row["tokens"]))
    # Base and each demo adapter answer differently: the LoRA really was applied.
    assert len(by_adapter) == len(DEMO_ADAPTERS) + 1
    assert len({frozenset(v) for v in by_adapter.values()}) == len(by_adapter)


def test_every_slot_full_and_rewritten(adapters, tmp_path) -> None:
    """max_loras 1 with two adapters: the one slot is always full and vLLM rewrites it
    when it switches adapter. Base requests in the same batch must still answer as the
    base model alone does (vLLM 0.32's CPU ops apply the last slot's LoRA to them;
    loraplex's ops skip them); each rewrite lays out only that slot, at the write (no
    layer re-lays out on the forward after it), and the second adapter answers with its
    own weights, not the first one's."""
    log: list[str] = []
    ours = engine_outputs("loraplex", 1, adapters, tmp_path / "full.json", log)
    base_in_batch = [row["tokens"] for row in ours["mixed"] if row["adapter"] is None]
    assert base_in_batch == ours["base_alone"]
    answers: dict[str | None, list] = {}
    for row in ours["mixed"]:
        answers.setdefault(row["adapter"], []).append(row["tokens"])
    assert len({tuple(map(tuple, rows)) for rows in answers.values()}) == len(adapters) + 1
    assert "laid out slot 0 of 120 LoRA layers where vLLM wrote it" in log[0]
    assert "re-laying out written slots" not in log[0]
    assert "without a recorded slot write" not in log[0]
