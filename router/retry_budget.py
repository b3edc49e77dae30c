"""How many failed requests the router may send again: a share of recent traffic.

Retrying every failure doubles the load on a cluster that is failing because it is
overloaded; a budget keeps retries to `ratio` of the requests of the last minute. A
quiet router would then almost never be allowed one (one request a minute x 0.1), so a
small floor of retries per window always remains, as in Finagle's RetryBudget
(`minRetriesPerSec`) — `ratio` 0 turns retries off entirely.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 60
# Retries per window allowed whatever the traffic (when the ratio is not 0).
MIN_RETRIES_PER_WINDOW = 10


class RetryBudget:
    """Counts requests and retries in one-second buckets over a rolling window."""

    def __init__(
        self,
        ratio: float,
        window_s: int = WINDOW_S,
        min_retries: int = MIN_RETRIES_PER_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.min_retries = min_retries if ratio > 0 else 0
        self.clock = clock
        # [second, requests, retries], oldest first; sums kept alongside.
        self._buckets: deque[list[int]] = deque()
        self._requests = 0
        self._retries = 0

    def _bucket(self) -> list[int]:
        now = int(self.clock())
        while self._buckets and self._buckets[0][0] <= now - self.window_s:
            _, requests, retries = self._buckets.popleft()
            self._requests -= requests
            self._retries -= retries
        if not self._buckets or self._buckets[-1][0] != now:
            self._buckets.append([now, 0, 0])
        return self._buckets[-1]

    def record_request(self) -> None:
        self._bucket()[1] += 1
        self._requests += 1

    def try_spend(self) -> bool:
        """Take one retry if the budget allows it."""
        bucket = self._bucket()
        if self._retries + 1 > max(self.min_retries, self.ratio * self._requests):
            return False
        bucket[2] += 1
        self._retries += 1
        return True
