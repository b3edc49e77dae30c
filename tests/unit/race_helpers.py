"""Run one call from several threads at the same moment, for the database race tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_together(call: Callable[[int], Any], threads: int = 8) -> list[Any]:
    """`call(i)` for i in range(threads), released together; each result or the exception
    it raised, in order of i."""
    barrier = threading.Barrier(threads)
    outcomes: list[Any] = [None] * threads

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = call(i)
        except Exception as exc:
            outcomes[i] = exc

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    return outcomes
