"""The quality gate at publish: an adapter must beat prompting the base model with examples.

`loraplex train` and `loraplex eval --write-manifest` record held-out scores in the
manifest: `base`, `base_few_shot_<k>` (the base model given k training examples as
earlier chat turns) and `adapter`. Training an adapter is only worth serving when it
does better than that few-shot prompt, so publish compares the two and refuses an
adapter whose gain over the best few-shot baseline is below `min_gain` (in metric
units: 0.05 is five points of exact match). An adapter without those scores cannot
show it; `force` publishes anyway, and the decision (with who forced it) is stored
beside the version in the catalog, so a forced version is visible later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FEW_SHOT = re.compile(r"base_few_shot_([0-9]+)")


class QualityGateRefused(ValueError):
    """The adapter does not show the required gain; the message carries the numbers."""


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    """The scores showed the required gain (False: published only because forced)."""
    reason: str
    """The numbers, or what is missing, in one line."""
    forced_by: str | None = None
    min_gain: float = 0.0
    adapter: float | None = None
    baseline: float | None = None
    baseline_setting: str | None = None
    examples: int | None = None

    def to_json(self) -> dict[str, Any]:
        """What the catalog stores in the version's `gate` column."""
        return {
            "passed": self.passed,
            "forced": self.forced_by is not None,
            "forced_by": self.forced_by,
            "reason": self.reason,
            "min_gain": self.min_gain,
            "adapter": self.adapter,
            "baseline": self.baseline,
            "baseline_setting": self.baseline_setting,
            "examples": self.examples,
        }


def _points(value: float) -> str:
    return f"{value * 100:+.1f} points"


def judge(
    manifest: dict[str, Any] | None,
    *,
    min_gain: float = 0.0,
    force: bool = False,
    forced_by: str | None = None,
) -> GateDecision:
    """The gate's decision for an adapter with `manifest` (None: the folder has none).

    Raises QualityGateRefused (the numbers in its message) unless the adapter passes or
    `force`; a forced decision records `forced_by` and why the gate would have refused.
    """
    scores: dict[str, float] = dict((manifest or {}).get("eval") or {})
    metric = ((manifest or {}).get("training_config") or {}).get("eval", {}).get("metric")
    metric = metric or "held-out metric"
    examples = ((manifest or {}).get("dataset") or {}).get("eval_examples") or None
    shots = {key: value for key, value in scores.items() if FEW_SHOT.fullmatch(key)}
    on = f" on {examples} held-out examples" if examples else ""
    if manifest is None:
        problem = "manifest.json: missing, so the adapter has no held-out scores"
    elif "adapter" not in scores:
        problem = "manifest.json: eval has no `adapter` score"
    elif not shots:
        found = ", ".join(f"{k} {v:.1%}" for k, v in sorted(scores.items()))
        problem = (
            f"manifest.json: eval has no few-shot baseline (base_few_shot_<k>); found: {found}"
        )
    else:
        problem = None
    if problem is not None:
        how = (
            "train with eval.few_shot > 0, or run `loraplex eval DIR --data HELD_OUT.jsonl "
            "--few-shot 3 --write-manifest`"
        )
        if not force:
            raise QualityGateRefused(
                f"quality gate: {problem}; {how}, or publish with --force (recorded)"
            )
        return GateDecision(
            False, problem, forced_by, min_gain, scores.get("adapter"), None, None,
            examples,
        )  # fmt: skip

    setting, baseline = max(shots.items(), key=lambda item: item[1])
    adapter = scores["adapter"]
    gain = adapter - baseline
    numbers = (
        f"{metric}{on}: adapter {adapter:.1%}, {setting} {baseline:.1%}"
        + (f", base {scores['base']:.1%}" if "base" in scores else "")
        + f"; gain {_points(gain)}, required {_points(min_gain)} (--min-gain {min_gain:g})"
    )
    # A rounding margin: scores are means over examples, the gain a difference of two.
    if gain + 1e-9 >= min_gain:
        return GateDecision(True, numbers, None, min_gain, adapter, baseline, setting, examples)
    if not force:
        raise QualityGateRefused(
            f"quality gate: the adapter does not beat its few-shot baseline: {numbers}. "
            "Publish anyway with --force (recorded in the catalog)"
        )
    return GateDecision(False, numbers, forced_by, min_gain, adapter, baseline, setting, examples)
