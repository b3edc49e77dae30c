"""`torchrun --nproc_per_node 2 ... loraplex train` (gloo, CPU) equals one process.

Two ranks each train on half of every global batch; with gradients summed and
the loss divided by the global answer-token count they must take the same
optimizer steps as a single process given the same global batch and seed, and
only rank 0 may write the output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex.adapters.manifest import read_manifest
from loraplex.base_model import embedded_model_dir, verify_model_dir
from loraplex.training.config import load_config
from loraplex.training.run import train_task
from loraplex.training.trainer import CHECKPOINTS_DIR
from tests.unit.tiny_llama import TASK, build_tiny_llama

pytestmark = pytest.mark.skipif(
    verify_model_dir(embedded_model_dir()) is not None, reason="run `loraplex model pull` first"
)
ROOT = Path(__file__).resolve().parents[2]


def write_task(tmp_path: Path) -> Path:
    """A tiny task whose batches split unevenly over two ranks.

    13 examples in micro-batches of 4: the fourth micro-batch holds one example,
    so rank 1 has nothing to train on for it; 5 held-out examples split 3 + 2.
    """
    base = build_tiny_llama(tmp_path / "tiny-llama")
    lines = (TASK / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:13]) + "\n")
    eval_lines = (TASK / "eval.jsonl").read_text().splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(eval_lines[:5]) + "\n")
    config = tmp_path / "train.yaml"
    config.write_text(
        f"name: tasks/tiny\nbase_model: {base}\ntrain_data: train.jsonl\n"
        "eval_data: eval.jsonl\nmax_seq_length: 256\nseed: 5\ncpu_threads: 1\n"
        "checkpoint_interval: 2\n"
        "optim: {lr: 0.01, max_steps: 3, batch_size: 4, grad_accumulation: 2, warmup_steps: 1}\n"
        "eval: {interval: 2, max_new_tokens: 4, few_shot: 1}\n"
    )
    return config


def test_two_ranks_train_the_same_adapter_as_one_process(tmp_path: Path) -> None:
    config_path = write_task(tmp_path)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "loraplex.cli",
            "train",
            str(config_path),
            "--output_dir",
            str(ddp_out / "run"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]

    config = load_config(config_path).model_copy(update={"output_dir": single_out / "run"})
    train_task(config)

    # One output folder, written once: rank 1 wrote nothing and printed nothing.
    assert [p.name for p in ddp_out.iterdir()] == ["run"]
    assert len(list(ddp_out.rglob("manifest.json"))) == 1
    out = launched.stdout
    assert out.count("data: 13 train, 5 eval examples") == 1
    assert out.count("base_few_shot_1") == 1
    assert out.splitlines().count(str(ddp_out / "run")) == 1
    assert not (ddp_out / "run" / CHECKPOINTS_DIR).exists()
    assert sorted(p.name for p in (ddp_out / "run").iterdir()) == sorted(
        p.name for p in (single_out / "run").iterdir()
    )

    ddp = load_file(ddp_out / "run" / "adapter_model.safetensors")
    single = load_file(single_out / "run" / "adapter_model.safetensors")
    assert ddp.keys() == single.keys()
    assert any(v.abs().sum() > 0 for k, v in single.items() if "lora_B" in k)
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=1e-6, msg=name)

    ddp_metrics = json.loads((ddp_out / "run" / "metrics.json").read_text())
    single_metrics = json.loads((single_out / "run" / "metrics.json").read_text())
    # Losses and held-out losses are global means; token counts are global sums.
    assert ddp_metrics["tokens"] == single_metrics["tokens"]
    for got, want in zip(ddp_metrics["history"], single_metrics["history"], strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5), (key, got, want)
    # Held-out scoring is split over the ranks and gathered: same numbers.
    assert read_manifest(ddp_out / "run").eval == read_manifest(single_out / "run").eval
