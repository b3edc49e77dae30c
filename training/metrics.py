"""Held-out task metrics: score one answer against its reference.

Kept apart from evaluate.py (torch, transformers, peft: seconds of import) so that
scoring answers a server gave (`loraplex adapters eval`) needs none of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

Scorer = Callable[[str, str], float]


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def json_match(prediction: str, reference: str) -> float:
    """1 when the answer parses as JSON equal to the reference (key order and spacing free)."""
    try:
        return float(json.loads(prediction.strip()) == json.loads(reference))
    except ValueError:
        return 0.0


SCORERS: dict[str, Scorer] = {"exact_match": exact_match, "json_match": json_match}
