"""Weighted aliases: the `--to v3=90,v4=10` split, the sticky pick of one version per end
user, and the opt-in rollback guard (`error_rate<=2x,min_requests=200`).

Pure functions and values: the catalog stores splits and guards, the router picks and
counts. A pick hashes the end user's key into one of 10,000 buckets, and the split's
versions own consecutive bucket ranges in version order (older first), so:
- the same user lands on the same version while the weights stand;
- raising a canary's weight (the newest version, last in the order) only moves users
  onto it, never the canary's existing users off it.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from loraplex.adapters.names import InvalidAdapterName
from loraplex.adapters.refs import parse_version

TOTAL_WEIGHT = 100
_BUCKETS = 10_000
_GUARD_PART = re.compile(r"(error_rate)\s*<=\s*([0-9]+(?:\.[0-9]+)?)x|(min_requests)=([0-9]+)")


class InvalidSplit(InvalidAdapterName):
    """The split or guard text cannot be used; the message says why."""


def parse_weights(text: str) -> dict[int, int]:
    """`v4` (all traffic) or `v3=90,v4=10` (integers summing to 100) → {version: weight}."""
    text = text.strip()
    if "=" not in text and "," not in text:
        return {parse_version(text): TOTAL_WEIGHT}
    weights: dict[int, int] = {}
    for part in text.split(","):
        version_text, sep, weight_text = part.strip().partition("=")
        if not sep:
            raise InvalidSplit(f"{part.strip()!r}: expected vN=WEIGHT, e.g. v3=90,v4=10")
        number = parse_version(version_text.strip())
        if number in weights:
            raise InvalidSplit(f"v{number} appears twice in {text!r}")
        if not weight_text.strip().isdigit():
            raise InvalidSplit(f"weight of v{number} is {weight_text.strip()!r}: use an integer")
        weights[number] = int(weight_text)
    return check_weights(weights)


def check_weights(weights: dict[int, int]) -> dict[int, int]:
    if not weights:
        raise InvalidSplit("a split needs at least one version")
    for number, weight in weights.items():
        if not 1 <= weight <= TOTAL_WEIGHT:
            raise InvalidSplit(f"weight of v{number} is {weight}: use 1-{TOTAL_WEIGHT}")
    total = sum(weights.values())
    if total != TOTAL_WEIGHT:
        raise InvalidSplit(f"weights sum to {total}, not {TOTAL_WEIGHT}: {format_weights(weights)}")
    return dict(sorted(weights.items()))


def format_weights(weights: dict[int, int]) -> str:
    """The `--to` text: `v3=90,v4=10`, or `v4` for one version."""
    if len(weights) == 1:
        return f"v{next(iter(weights))}"
    return ",".join(f"v{n}={w}" for n, w in sorted(weights.items()))


def incumbent_of(weights: dict[int, int]) -> int:
    """The version the others are compared with and rolled back to: the heaviest weight,
    the older version on a tie."""
    return min(weights, key=lambda n: (-weights[n], n))


@dataclass(frozen=True)
class RolloutGuard:
    error_rate_factor: float
    """Roll back when the canary's server-error rate exceeds the incumbent's times this."""
    min_requests: int
    """The canary's window: it is judged on each run of this many of its requests."""

    def __str__(self) -> str:
        return f"error_rate<={self.error_rate_factor:g}x,min_requests={self.min_requests}"

    def tripped(self, canary: tuple[int, int], incumbent: tuple[int, int]) -> bool:
        """Whether the canary's (requests, server errors) are worse than the incumbent's by
        the factor. A canary without errors never trips; against an incumbent without
        errors, any error rate does (0 × factor is 0)."""
        canary_requests, canary_errors = canary
        incumbent_requests, incumbent_errors = incumbent
        if canary_requests < self.min_requests or canary_errors == 0:
            return False
        incumbent_rate = incumbent_errors / incumbent_requests if incumbent_requests else 0.0
        return canary_errors / canary_requests > self.error_rate_factor * incumbent_rate


def parse_guard(text: str) -> RolloutGuard:
    """`error_rate<=2x,min_requests=200` (both parts required, any order)."""
    factor: float | None = None
    min_requests: int | None = None
    for part in text.split(","):
        match = _GUARD_PART.fullmatch(part.strip())
        if match is None:
            raise InvalidSplit(
                f"guard part {part.strip()!r} not understood: expected "
                "error_rate<=FACTORx and min_requests=N, e.g. error_rate<=2x,min_requests=200"
            )
        if match.group(1):
            factor = float(match.group(2))
        else:
            min_requests = int(match.group(4))
    if factor is None or min_requests is None:
        raise InvalidSplit(f"guard {text!r} needs both error_rate<=FACTORx and min_requests=N")
    if factor < 1:
        raise InvalidSplit(f"guard factor {factor:g}x is below 1x: the canary could never pass")
    if min_requests < 1:
        raise InvalidSplit("guard min_requests must be at least 1")
    return RolloutGuard(factor, min_requests)


def bucket(user_key: str | None, split_key: str) -> int:
    """The end user's bucket in [0, 10000) for the alias `split_key`; a request without any
    user key gets a random one (no stickiness is possible)."""
    if user_key is None:
        return random.randrange(_BUCKETS)
    digest = hashlib.blake2b(f"{split_key}\0{user_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _BUCKETS


def pick(weighted: Sequence[tuple[int, int]], user_bucket: int) -> int:
    """The version (of (version, weight) pairs) whose bucket range holds `user_bucket`."""
    ordered = sorted(weighted)
    edge = 0
    for number, weight in ordered:
        edge += weight * (_BUCKETS // TOTAL_WEIGHT)
        if user_bucket < edge:
            return number
    return ordered[-1][0]
