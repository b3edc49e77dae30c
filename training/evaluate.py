"""Generation-based task metrics on held-out data: base, base with k shots, adapter.

Each held-out example's prompt is rendered with the chat template, the model
answers greedily, and the answer is scored against the reference. The few-shot
baseline puts k training examples before the question as earlier chat turns:
the prompt-engineering result an adapter has to beat to be worth training.
`loraplex eval --write-manifest` records what it printed in the adapter's
manifest.json, so the numbers a user saw and the manifest agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.adapters.manifest import MANIFEST_FILE, read_manifest, sha256_file
from loraplex.base_model import base_model_dir
from loraplex.training.data import Example, read_examples
from loraplex.training.metrics import (  # the scorers' old home: still importable here
    SCORERS,
    Scorer,  # noqa: F401
    exact_match,  # noqa: F401
    json_match,  # noqa: F401
)


@dataclass
class EvalResult:
    score: float
    predictions: list[str]


def few_shot_messages(
    shots: Sequence[Example], prompt: list[dict[str, str]]
) -> list[dict[str, str]]:
    """`prompt` preceded by each shot's question and answer as earlier turns."""
    turns: list[dict[str, str]] = []
    for shot in shots:
        turns += [m for m in shot.messages if m["role"] != "system"]
    system = [m for m in prompt if m["role"] == "system"]
    return system + turns + [m for m in prompt if m["role"] != "system"]


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = [
            tokenizer(
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
            for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device
        )
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return answers


def score_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    metric: str,
    max_new_tokens: int,
    shots: Sequence[Example] = (),
) -> EvalResult:
    prompts = [few_shot_messages(shots, e.prompt) if shots else e.prompt for e in examples]
    predictions = generate_answers(model, tokenizer, prompts, max_new_tokens)
    scorer = SCORERS[metric]
    scores = [scorer(p, e.answer) for p, e in zip(predictions, examples, strict=True)]
    return EvalResult(sum(scores) / len(scores), predictions)


def compare_table(metric: str, results: dict[str, float]) -> str:
    """The settings side by side, as printed after training and by `loraplex eval`."""
    width = max(len(name) for name in results)
    rows = [f"{'setting':<{width}}  {metric}"]
    rows += [f"{name:<{width}}  {value:6.1%}" for name, value in results.items()]
    return "\n".join(rows)


def evaluate_adapter(
    adapter_dir: Path,
    data: Path,
    *,
    few_shot: int = 0,
    train_data: Path | None = None,
    metric: str | None = None,
    max_new_tokens: int | None = None,
    max_examples: int | None = None,
    base_model: Path | None = None,
    write_manifest: bool = False,
) -> tuple[str, dict[str, float]]:
    """Score base, base with `few_shot` shots, and the adapter on `data`: (metric, scores).

    Defaults (base model, metric, tokens, the training data for shots) come from the
    adapter's manifest.json when it has one. `write_manifest` records the scores in it
    (checked before any model is loaded: the manifest must exist and use this metric).
    """
    training: dict[str, Any] = {}
    manifest_path = adapter_dir / MANIFEST_FILE
    if manifest_path.is_file():
        training = read_manifest(adapter_dir).training_config
    elif write_manifest:
        raise ValueError(f"{manifest_path}: no manifest to write the scores into")
    eval_settings = training.get("eval", {})
    recorded_metric = eval_settings.get("metric", "exact_match")
    metric = metric or recorded_metric
    if metric not in SCORERS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(SCORERS)}")
    if write_manifest and metric != recorded_metric:
        # The manifest's scores are read with its training config's metric.
        raise ValueError(
            f"{manifest_path}: records {recorded_metric} scores; cannot write {metric} ones"
        )
    max_new_tokens = max_new_tokens or eval_settings.get("max_new_tokens", 48)
    if base_model is None:
        base_model = base_model_dir(training.get("base_model") or "")
    examples = read_examples(data)[:max_examples]
    shots: list[Example] = []
    if few_shot:
        source = train_data or (Path(training["train_data"]) if "train_data" in training else None)
        if source is None:
            raise ValueError("--few-shot needs --train-data (no manifest names the training data)")
        shots = read_examples(source)[:few_shot]

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    results: dict[str, float] = {}
    with model.disable_adapter():
        results["base"] = score_model(model, tokenizer, examples, metric, max_new_tokens).score
        if shots:
            results[f"base_few_shot_{few_shot}"] = score_model(
                model, tokenizer, examples, metric, max_new_tokens, shots
            ).score
    results["adapter"] = score_model(model, tokenizer, examples, metric, max_new_tokens).score
    if write_manifest:
        record_eval(adapter_dir, data, results, len(examples))
    return metric, results


def record_eval(adapter_dir: Path, data: Path, results: dict[str, float], examples: int) -> Path:
    """Make `results` the manifest's held-out scores, with the data they were measured on.

    The whole `eval` mapping is replaced, so no score from another data file or
    another k of few-shot stays beside the new ones.
    """
    manifest = read_manifest(adapter_dir)
    dataset = manifest.dataset.model_copy(
        update={"eval_sha256": sha256_file(data), "eval_examples": examples}
    )
    return manifest.model_copy(update={"eval": dict(results), "dataset": dataset}).write(
        adapter_dir
    )
