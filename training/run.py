"""One training run end to end: data → LoRA training → evaluation → adapter folder.

The run folder (`output_dir`) ends up holding a standard peft adapter
(`adapter_config.json`, `adapter_model.safetensors`) that `loraplex serve` loads
as is, plus `manifest.json`, the resolved `config.yaml`, `metrics.json`,
`data_report.json` and `loss.png`.

Under torchrun every rank runs this function on the same config: all of them
read and tokenize the data and train their shard; rank 0 alone prints reports
and writes files, and held-out scoring is split across the ranks.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.adapters.compat import ensure_servable
from loraplex.adapters.manifest import (
    AdapterManifest,
    BaseModelInfo,
    DatasetInfo,
    sha256_bytes,
    sha256_file,
)
from loraplex.base_model import base_model_dir, weights_hash
from loraplex.training.config import TrainConfig
from loraplex.training.data import (
    DataError,
    Example,
    TokenizedExample,
    read_examples,
    tokenize_examples,
)
from loraplex.training.data_report import build_data_report, format_data_report, write_data_report
from loraplex.training.distributed import SINGLE, Ranks, launched_ranks, start
from loraplex.training.evaluate import compare_table, score_model
from loraplex.training.plots import LOSS_PLOT_FILE, plot_losses
from loraplex.training.trainer import LoopSettings, TrainState, train_loop

METRICS_FILE = "metrics.json"


@dataclass
class RunResult:
    run_dir: Path
    state: TrainState
    eval: dict[str, float]
    train_seconds: float


def pick_device(config: TrainConfig, ranks: Ranks = SINGLE) -> torch.device:
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and ranks.active:
        return torch.device("cuda", ranks.local_rank)  # one GPU per process
    return torch.device(kind)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Last name part of every nn.Linear except the output head: what LoRA may target."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


def split_data(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    train = read_examples(config.train_data)
    if config.eval_data is not None:
        return train, read_examples(config.eval_data)
    if config.eval.split == 0:
        return train, []
    order = list(range(len(train)))
    random.Random(config.seed).shuffle(order)
    n_eval = max(1, int(len(train) * config.eval.split))
    held = set(order[:n_eval])
    evaluation = [e for i, e in enumerate(train) if i in held]
    train = [e for i, e in enumerate(train) if i not in held]
    if not train:
        raise DataError(f"{config.train_data}: eval.split leaves no training example")
    return train, evaluation


def load_base(base_dir: Path, device: torch.device) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    return model, tokenizer


def _tokenizer_hashes(base_dir: Path, tokenizer: Any) -> tuple[str, str]:
    tokenizer_file = base_dir / "tokenizer.json"
    tokenizer_hash = sha256_file(tokenizer_file) if tokenizer_file.is_file() else ""
    template = tokenizer.chat_template or ""
    return tokenizer_hash, sha256_bytes(template.encode())


def _fix_adapter_config(run_dir: Path, base_dir: Path) -> dict[str, Any]:
    # peft records the absolute base path; the folder name keeps the adapter portable.
    path = run_dir / "adapter_config.json"
    adapter_config = json.loads(path.read_text())
    adapter_config["base_model_name_or_path"] = base_dir.name
    path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return adapter_config


def evaluate_settings(
    model: Any,
    tokenizer: Any,
    config: TrainConfig,
    train: list[Example],
    evaluation: list[Example],
    include_adapter: bool = True,
    ranks: Ranks = SINGLE,
) -> dict[str, float]:
    """Held-out metric for base, base with k shots, and the adapter (a peft model)."""
    examples = evaluation[: config.eval.max_examples]
    metric, tokens = config.eval.metric, config.eval.max_new_tokens

    def score(shots: list[Example]) -> float:
        # Each rank answers its shard; the mean is taken over all of them.
        mine = ranks.shard(examples)
        local = score_model(model, tokenizer, mine, metric, tokens, shots).score if mine else 0.0
        total, count = ranks.sum([local * len(mine), len(mine)])
        return total / count

    results: dict[str, float] = {}
    if config.eval.baselines:
        with model.disable_adapter():
            results["base"] = score([])
            k = config.eval.few_shot
            if k:
                results[f"base_few_shot_{k}"] = score(train[:k])
    if include_adapter:
        results["adapter"] = score([])
    return results


def train_task(config: TrainConfig, on_step: Any = None) -> RunResult:
    """Train, evaluate and write one adapter; see the module docstring for the files."""
    run_dir = config.run_dir
    ranks = launched_ranks()
    device = pick_device(config, ranks)
    start(ranks, device)
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.write_resolved(run_dir)
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    # Data errors surface before any model is loaded.
    train, evaluation = split_data(config)
    base_dir = base_model_dir(config.base_model)
    model, tokenizer = load_base(base_dir, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    train_tok, train_report = tokenize_examples(
        tokenizer, train, config.max_seq_length, config.too_long
    )
    if not train_tok:
        raise DataError(
            f"{config.train_data}: every example is longer than max_seq_length="
            f"{config.max_seq_length}"
        )
    eval_tok: list[TokenizedExample] = []
    eval_report = None
    if evaluation:
        eval_tok, eval_report = tokenize_examples(
            tokenizer, evaluation, config.max_seq_length, "truncate"
        )
    if ranks.is_main:
        report = build_data_report(
            train, evaluation, train_report, eval_report, config.max_seq_length
        )
        tqdm.write(format_data_report(report))
        write_data_report(report, run_dir)

    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        use_rslora=config.lora.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Refuse before spending compute on an adapter vLLM would not serve.
    ensure_servable(
        lora.to_dict(),
        max_lora_rank=config.max_lora_rank,
        known_modules=linear_module_names(model),
    )
    seed_everything(config.seed)
    model = get_peft_model(model, lora)
    if config.optim.gradient_checkpointing:
        # Non-reentrant checkpointing needs no gradient on the (frozen) inputs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    started = time.perf_counter()
    settings = LoopSettings(
        optim=config.optim,
        seed=config.seed,
        eval_interval=config.eval.interval,
        checkpoint_interval=config.checkpoint_interval,
        keep_checkpoints=config.keep_checkpoints,
        early_stopping_patience=config.early_stopping_patience,
        resume=config.resume,
        ranks=ranks,
    )
    state = train_loop(model, train_tok, eval_tok, settings, run_dir, pad_id, on_step)
    train_seconds = time.perf_counter() - started

    results: dict[str, float] = {}
    if evaluation:
        results = evaluate_settings(model, tokenizer, config, train, evaluation, ranks=ranks)
    if not ranks.is_main:
        return RunResult(run_dir, state, results, train_seconds)

    model.save_pretrained(run_dir)
    adapter_config = _fix_adapter_config(run_dir, base_dir)
    plot_losses(state.history, run_dir / LOSS_PLOT_FILE, config.name)
    if results:
        tqdm.write(compare_table(config.eval.metric, results))

    tokenizer_hash, template_hash = _tokenizer_hashes(base_dir, tokenizer)
    AdapterManifest(
        name=config.name,
        base_model=BaseModelInfo(
            id=base_dir.name,
            weights_sha256=weights_hash(base_dir),
            tokenizer_sha256=tokenizer_hash,
            chat_template_sha256=template_hash,
        ),
        peft_config=adapter_config,
        training_config=config.model_dump(mode="json"),
        dataset=DatasetInfo(
            train_sha256=sha256_file(config.train_data),
            train_examples=len(train_tok),
            eval_sha256=sha256_file(config.eval_data) if config.eval_data else None,
            # The examples the eval scores were measured on, as `loraplex eval` records.
            eval_examples=len(evaluation[: config.eval.max_examples]),
        ),
        eval=results,
    ).write(run_dir)
    metrics = {
        "steps": state.step,
        "train_seconds": round(train_seconds, 1),
        "tokens": state.tokens,
        "tokens_per_second": round(state.tokens / max(train_seconds, 1e-9), 1),
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "eval_metric": config.eval.metric,
        "eval": results,
        "history": state.history,
    }
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return RunResult(run_dir, state, results, train_seconds)
