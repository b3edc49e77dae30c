"""The training loop and a whole run on a tiny Llama: files written, determinism, resume.

The tiny model has SmolLM2's tokenizer and architecture but 2 layers of width 16,
so a run takes seconds; the real base model is trained in the integration test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from loraplex.adapters.compat import IncompatibleAdapter
from loraplex.adapters.manifest import read_manifest
from loraplex.base_model import embedded_model_dir, verify_model_dir
from loraplex.training.config import LLAMA_PROJECTIONS, OptimSection, TrainConfig
from loraplex.training.data import read_examples, tokenize_examples
from loraplex.training.trainer import CHECKPOINTS_DIR, LoopSettings, TrainState, train_loop
from tests.unit.tiny_llama import TASK, build_tiny_llama

pytestmark = pytest.mark.skipif(
    verify_model_dir(embedded_model_dir()) is not None, reason="run `loraplex model pull` first"
)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def lora_model(base: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    return get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS))
    )


def settings(resume: bool = True) -> LoopSettings:
    optim = OptimSection(lr=1e-2, max_steps=6, batch_size=4, grad_accumulation=2, warmup_steps=1)
    return LoopSettings(
        optim=optim,
        seed=3,
        eval_interval=3,
        checkpoint_interval=2,
        keep_checkpoints=2,
        early_stopping_patience=None,
        resume=resume,
    )


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_gives_the_uninterrupted_result(
    tiny_base: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    data, _ = tokenize_examples(tokenizer, read_examples(TASK / "train.jsonl")[:40], 256)
    straight = lora_model(tiny_base)
    state = train_loop(straight, data, data[:8], settings(), tmp_path / "a", pad_id=2)
    assert state.step == 6 and not (tmp_path / "a" / CHECKPOINTS_DIR).exists()
    assert state.history[-1]["loss"] < state.history[0]["loss"]

    def crash_at_5(s: TrainState) -> None:
        if s.step == 5:
            raise Crash

    interrupted = lora_model(tiny_base)
    with pytest.raises(Crash):
        train_loop(interrupted, data, data[:8], settings(), tmp_path / "b", 2, crash_at_5)
    # The newest complete checkpoint is step 4; keep_checkpoints=2 left step 2 as well.
    saved = sorted(p.name for p in (tmp_path / "b" / CHECKPOINTS_DIR).iterdir())
    assert saved == ["step-0000002", "step-0000004"]

    resumed = lora_model(tiny_base)  # fresh weights: everything must come from the checkpoint
    state_b = train_loop(resumed, data, data[:8], settings(), tmp_path / "b", pad_id=2)
    assert state_b.step == 6 and len(state_b.history) == 6
    for name, tensor in lora_weights(straight).items():
        torch.testing.assert_close(lora_weights(resumed)[name], tensor, rtol=0, atol=1e-6)


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_base: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    data, _ = tokenize_examples(tokenizer, read_examples(TASK / "train.jsonl")[:40], 256)
    runs = []
    for i, seed in enumerate((3, 3, 4)):
        model = lora_model(tiny_base)
        loop = settings(resume=False)
        loop.seed = seed
        loop.optim = loop.optim.model_copy(update={"max_steps": 3, "grad_accumulation": 1})
        train_loop(model, data, [], loop, tmp_path / str(i), pad_id=2)
        runs.append(lora_weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_a_run_writes_a_servable_adapter_and_its_records(tiny_base: Path, tmp_path: Path) -> None:
    from loraplex.training.run import train_task

    config = TrainConfig(
        name="tasks/tiny",
        base_model=str(tiny_base),
        train_data=(TASK / "train.jsonl").resolve(),
        eval_data=(TASK / "eval.jsonl").resolve(),
        output_dir=tmp_path / "run",
        optim={"max_steps": 3, "batch_size": 4, "lr": 1e-2},
        eval={"interval": 2, "max_examples": 4, "max_new_tokens": 4, "few_shot": 1},
    )
    result = train_task(config)
    run = tmp_path / "run"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "config.yaml",
        "metrics.json",
        "data_report.json",
        "loss.png",
    ):
        assert (run / name).is_file(), name
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_base.name
    assert adapter_config["r"] == 8 and adapter_config["use_dora"] is False
    weights = load_file(run / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    manifest = read_manifest(run)
    assert set(manifest.eval) == {"base", "base_few_shot_1", "adapter"} == set(result.eval)
    # eval_examples counts the held-out examples the scores were measured on.
    assert manifest.dataset.train_examples == 400 and manifest.dataset.eval_examples == 4
    assert manifest.base_model.weights_sha256 and manifest.base_model.chat_template_sha256
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and [h["step"] for h in metrics["history"]] == [1, 2, 3]
    assert "eval_loss" in metrics["history"][1]
    assert json.loads((run / "data_report.json").read_text())["eval_prompts_in_train"] == 0


def test_unservable_lora_is_refused_before_training(tiny_base: Path, tmp_path: Path) -> None:
    from loraplex.training.run import train_task

    config = TrainConfig(
        name="tasks/tiny",
        base_model=str(tiny_base),
        train_data=(TASK / "train.jsonl").resolve(),
        output_dir=tmp_path / "run",
        lora={"r": 12, "target_modules": ["q_proj", "qkv_proj"]},
    )
    with pytest.raises(IncompatibleAdapter) as info:
        train_task(config)
    assert "use one of" in str(info.value) and "qkv_proj" in str(info.value)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    shutil.rmtree(tmp_path / "run")


def early_stopping(max_steps: int) -> LoopSettings:
    # Measured on the tiny model: held-out loss is lowest after step 1 at this lr, so
    # patience 2 stops at step 3 and must hand back the step-1 weights.
    optim = OptimSection(
        lr=0.05, max_steps=max_steps, batch_size=4, warmup_steps=0, schedule="constant"
    )
    return LoopSettings(
        optim=optim,
        seed=3,
        eval_interval=1,
        checkpoint_interval=2,
        keep_checkpoints=2,
        early_stopping_patience=2,
        resume=True,
    )


def test_early_stopping_keeps_the_best_weights_across_a_resume(
    tiny_base: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    data, _ = tokenize_examples(tokenizer, read_examples(TASK / "train.jsonl")[:40], 256)
    held_out, _ = tokenize_examples(tokenizer, read_examples(TASK / "eval.jsonl")[:8], 256)
    step_1 = lora_model(tiny_base)
    train_loop(step_1, data, held_out, early_stopping(1), tmp_path / "one", pad_id=2)

    straight = lora_model(tiny_base)
    state = train_loop(straight, data, held_out, early_stopping(10), tmp_path / "a", pad_id=2)
    assert (state.stopped_early, state.best_step, state.step) == (True, 1, 3)

    def crash_at_3(s: TrainState) -> None:
        if s.step == 3:
            raise Crash

    interrupted = lora_model(tiny_base)
    with pytest.raises(Crash):
        train_loop(interrupted, data, held_out, early_stopping(10), tmp_path / "b", 2, crash_at_3)
    # The step-2 checkpoint is newer than the best step: the best weights ride along.
    resumed = lora_model(tiny_base)
    state_b = train_loop(resumed, data, held_out, early_stopping(10), tmp_path / "b", pad_id=2)
    assert (state_b.stopped_early, state_b.best_step, state_b.step) == (True, 1, 3)
    for name, tensor in lora_weights(step_1).items():
        torch.testing.assert_close(lora_weights(straight)[name], tensor, rtol=0, atol=1e-6)
        torch.testing.assert_close(lora_weights(resumed)[name], tensor, rtol=0, atol=1e-6)
