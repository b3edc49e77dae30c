"""The training loop: LoRA weights, AdamW, a schedule, checkpoints and resume.

A plain torch loop (no Trainer framework) so that what runs is visible here.
The data order is a pure function of (seed, epoch), so a resumed run only
needs the step number to continue exactly where it stopped; the checkpoint
holds the LoRA weights, optimizer, schedule and RNG state, and the best
weights so far when early stopping is on.

Under a launcher (see `distributed.py`) each rank trains on a shard of every
global micro-batch; the loss is divided by the answer tokens of the whole
global step, so N processes take the same optimizer step as one.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_scheduler

from loraplex.training.config import OptimSection
from loraplex.training.data import IGNORE_INDEX, TokenizedExample
from loraplex.training.distributed import SINGLE, Ranks

CHECKPOINTS_DIR = "checkpoints"
BEST_WEIGHTS_FILE = "best_adapter_model.safetensors"


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    """Tokens (prompt and answer) processed, for throughput."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per optimizer step: step, loss, lr; eval_loss on evaluation steps."""
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


@dataclass
class LoopSettings:
    optim: OptimSection
    seed: int
    eval_interval: int
    checkpoint_interval: int
    keep_checkpoints: int
    early_stopping_patience: int | None
    resume: bool
    ranks: Ranks = SINGLE
    """This process among the data-parallel ones; SINGLE when not launched by torchrun."""


def total_steps(n_examples: int, optim: OptimSection) -> int:
    if optim.max_steps is not None:
        return optim.max_steps
    per_epoch = math.ceil(n_examples / optim.batch_size) / optim.grad_accumulation
    return max(1, math.ceil(per_epoch * optim.epochs))


def micro_batch(n_examples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Example indices of global micro-batch `index`: a fresh seeded shuffle every epoch."""
    per_epoch = math.ceil(n_examples / batch_size)
    epoch, position = divmod(index, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size : (position + 1) * batch_size].tolist()


PAD_MULTIPLE = 16


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding carries no loss and no attention.

    Widths are rounded up to a multiple of PAD_MULTIPLE: few distinct shapes let
    the CPU kernels reuse their per-shape setup from step to step.
    """
    width = max(len(e.input_ids) for e in examples)
    width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    ids, labels, mask = [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        ids.append(e.input_ids + [pad_id] * pad)
        labels.append(e.labels + [IGNORE_INDEX] * pad)
        mask.append([1] * len(e.input_ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def summed_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of answer-token cross-entropies and their count (token i predicts label i+1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def answer_token_count(example: TokenizedExample) -> int:
    """Tokens of `example` that carry loss (the first token predicts nothing)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


@torch.no_grad()
def eval_loss(
    model: Any,
    examples: list[TokenizedExample],
    pad_id: int,
    batch_size: int,
    ranks: Ranks = SINGLE,
) -> float:
    """Mean answer-token loss over `examples`; each rank scores its shard."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = ranks.shard(examples)
    total, count = 0.0, 0
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start : start + batch_size], pad_id)
        loss, n = summed_loss(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss), count + n
    model.train(was_training)
    total, count = ranks.sum([total, count])
    return total / max(count, 1)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / CHECKPOINTS_DIR).glob("step-*"))


def _lora_weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _save_checkpoint(
    run_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    keep: int,
    best_weights: dict[str, torch.Tensor] | None,
) -> None:
    final = run_dir / CHECKPOINTS_DIR / f"step-{state.step:07d}"
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
        staging / "adapter_model.safetensors",
    )
    if best_weights is not None:
        # Without them a resumed run that then stops early would keep its last weights.
        save_file({k: v.contiguous() for k, v in best_weights.items()}, staging / BEST_WEIGHTS_FILE)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        },
        staging / "trainer.pt",
    )
    (staging / "state.json").write_text(json.dumps(asdict(state)))
    # Rename last: a crash mid-save never leaves a checkpoint that looks complete.
    staging.rename(final)
    for old in _checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


def _load_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any
) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """Restore a checkpoint into model, optimizer and scheduler: (state, best weights)."""
    device = next(model.parameters()).device
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    saved = torch.load(path / "trainer.pt", weights_only=False, map_location=device)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"].cpu())
    best_file = path / BEST_WEIGHTS_FILE
    best = load_file(best_file, device=str(device)) if best_file.is_file() else None
    return TrainState(**json.loads((path / "state.json").read_text())), best


def train_loop(
    model: Any,
    train: list[TokenizedExample],
    evaluation: list[TokenizedExample],
    settings: LoopSettings,
    run_dir: Path,
    pad_id: int,
    on_step: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train the LoRA weights of `model` in place; returns the final state.

    `on_step` is called after every optimizer step (after any checkpoint).
    Checkpoints are removed once the run completes: they exist to resume
    interrupted runs.
    """
    optim, ranks = settings.optim, settings.ranks
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    answer_counts = [answer_token_count(e) for e in train]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    steps = total_steps(len(train), optim)
    scheduler = get_scheduler(
        optim.schedule,
        optimizer,
        num_warmup_steps=min(optim.warmup_steps, steps),
        num_training_steps=steps,
    )
    state = TrainState()
    best_weights: dict[str, torch.Tensor] | None = None
    existing = _checkpoints(run_dir)
    # Every rank has listed the checkpoints before rank 0 may remove them.
    ranks.barrier()
    if settings.resume and existing:
        state, best_weights = _load_checkpoint(existing[-1], model, optimizer, scheduler)
        if ranks.is_main:
            tqdm.write(f"resuming from {existing[-1]} (step {state.step} of {steps})")
    elif ranks.is_main:
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    # The ranks seed alike, but one broadcast makes equal start weights a fact.
    ranks.broadcast_parameters(params)
    model.train()
    bar = tqdm(
        total=steps,
        initial=state.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not ranks.is_main,
    )
    while state.step < steps and not state.stopped_early:
        step_batches = [
            micro_batch(
                len(train),
                optim.batch_size,
                settings.seed,
                state.step * optim.grad_accumulation + j,
            )
            for j in range(optim.grad_accumulation)
        ]
        # Normalize by the answer tokens of the whole global step, so accumulation and
        # sharding over ranks equal one big batch whatever the micro-batch lengths.
        answer_tokens = max(1, sum(answer_counts[i] for b in step_batches for i in b))
        step_loss, step_tokens = 0.0, 0
        for indices in step_batches:
            mine = ranks.shard(indices)
            if not mine:  # a short last batch of the epoch: nothing for this rank
                continue
            batch = collate([train[i] for i in mine], pad_id)
            loss, _ = summed_loss(model, {k: v.to(device) for k, v in batch.items()})
            (loss / answer_tokens).backward()
            step_loss += loss.detach().item()
            step_tokens += int(batch["attention_mask"].sum())
        ranks.sum_gradients(params)
        step_loss, tokens = ranks.sum([step_loss, step_tokens])
        step_loss /= answer_tokens
        state.tokens += int(tokens)
        if optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        record: dict[str, float] = {
            "step": state.step,
            "loss": step_loss,
            "lr": scheduler.get_last_lr()[0],
        }
        if evaluation and (state.step % settings.eval_interval == 0 or state.step == steps):
            record["eval_loss"] = eval_loss(model, evaluation, pad_id, optim.batch_size, ranks)
            if state.best_eval_loss is None or record["eval_loss"] < state.best_eval_loss:
                state.best_eval_loss, state.best_step = record["eval_loss"], state.step
                state.evals_without_improvement = 0
                if settings.early_stopping_patience is not None:
                    best_weights = _lora_weights(model)
            else:
                state.evals_without_improvement += 1
                patience = settings.early_stopping_patience
                if patience is not None and state.evals_without_improvement >= patience:
                    state.stopped_early = True
        state.history.append(record)
        bar.update()
        bar.set_postfix(
            loss=f"{step_loss:.3f}",
            **({"eval_loss": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}),
        )
        checkpoint_due = state.step % settings.checkpoint_interval == 0 and state.step < steps
        if checkpoint_due and ranks.is_main:
            _save_checkpoint(
                run_dir,
                model,
                optimizer,
                scheduler,
                state,
                settings.keep_checkpoints,
                best_weights,
            )
        if on_step is not None:
            on_step(state)
    bar.close()
    if best_weights is not None and state.best_step != state.step:
        # Early stopping keeps the best held-out weights, also when max_steps came first.
        if ranks.is_main:
            why = "early stop" if state.stopped_early else "done"
            tqdm.write(f"{why} at step {state.step}; keeping step {state.best_step}")
        set_peft_model_state_dict(model, best_weights)
    if ranks.is_main:
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    return state
