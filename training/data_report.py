"""The data report printed and saved before training: problems seen before compute is spent.

Counts, token lengths, exact and near duplicates (same text after lower-casing and
dropping punctuation, digits and spacing), examples over the length limit, and
held-out examples whose prompt also appears in the training data.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from loraplex.training.data import Example, TokenizeReport

DATA_REPORT_FILE = "data_report.json"


def _exact_key(example: Example) -> str:
    return json.dumps(example.messages, sort_keys=True)


def _near_key(example: Example) -> str:
    text = " ".join(m["content"] for m in example.messages).lower()
    return re.sub(r"[\W\d_]+", " ", text).strip()


def _prompt_key(example: Example) -> str:
    return json.dumps(example.prompt, sort_keys=True)


def _duplicates(keys: list[str]) -> int:
    """Examples that repeat an earlier one."""
    return sum(count - 1 for count in Counter(keys).values())


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def build_data_report(
    train: list[Example],
    evaluation: list[Example],
    train_tokens: TokenizeReport,
    eval_tokens: TokenizeReport | None,
    max_seq_length: int,
) -> dict[str, Any]:
    train_prompts = {_prompt_key(e) for e in train}
    return {
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "max_seq_length": max_seq_length,
        "train_tokens": _length_stats(train_tokens.lengths),
        "eval_tokens": _length_stats(eval_tokens.lengths) if eval_tokens else {},
        "over_max_length": {
            "train": sum(n > max_seq_length for n in train_tokens.lengths),
            "eval": sum(n > max_seq_length for n in eval_tokens.lengths) if eval_tokens else 0,
        },
        "truncated": train_tokens.truncated,
        "skipped": train_tokens.skipped,
        "exact_duplicates": _duplicates([_exact_key(e) for e in train]),
        "near_duplicates": _duplicates([_near_key(e) for e in train]),
        "eval_prompts_in_train": sum(_prompt_key(e) in train_prompts for e in evaluation),
    }


def format_data_report(report: dict[str, Any]) -> str:
    def lengths(stats: dict[str, float]) -> str:
        return " ".join(f"{k}={v:g}" for k, v in stats.items()) or "-"

    lines = [
        f"data: {report['train_examples']} train, {report['eval_examples']} eval examples",
        f"  train tokens: {lengths(report['train_tokens'])}",
        f"  eval tokens:  {lengths(report['eval_tokens'])}",
        f"  over max_seq_length={report['max_seq_length']}: {report['over_max_length']} "
        f"(truncated {report['truncated']}, skipped {report['skipped']})",
        f"  duplicates in train: {report['exact_duplicates']} exact, "
        f"{report['near_duplicates']} near",
        f"  eval prompts also in train: {report['eval_prompts_in_train']}",
    ]
    return "\n".join(lines)


def write_data_report(report: dict[str, Any], folder: Path) -> Path:
    path = folder / DATA_REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
