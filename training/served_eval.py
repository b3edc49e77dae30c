"""Held-out scores measured through a running loraplex router: the path users get.

Each example's prompt goes to `/v1/chat/completions` as a chat conversation (the
server applies the chat template), answered greedily (temperature 0) by the engine
in its own dtype: bf16 by default, where a near-tie token can flip against the
float32 peft model `loraplex eval` runs, so the two scores may differ by an example
or so. Scoring is the same as evaluate.py's (metrics.py).

No torch here: this is an HTTP client, so `loraplex adapters eval` starts in a second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from loraplex.training.data import Example
from loraplex.training.metrics import SCORERS


class ServerError(RuntimeError):
    """The router refused or failed a request; the message has its status and error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServedScore:
    model: str
    """The `model` the requests named (e.g. acme/support:v4)."""
    score: float
    answers: list[str]
    scores: list[float]
    """Per example, in the data file's order."""

    @property
    def correct(self) -> float:
        return sum(self.scores)


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def ask(client: httpx.Client, model: str, example: Example, max_new_tokens: int) -> str:
    """The router's greedy answer to `example`'s prompt under `model`."""
    body = {
        "model": model,
        "messages": example.prompt,
        "max_tokens": max_new_tokens,
        "temperature": 0,
    }
    try:
        response = client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        raise ServerError(f"{client.base_url} unreachable: {exc}") from None
    if response.status_code != 200:
        raise ServerError(
            f"{model}: {response.status_code} from {client.base_url}: {_error_text(response)} "
            f"(example {example.source})",
            response.status_code,
        )
    return response.json()["choices"][0]["message"]["content"] or ""


def score_through_server(
    client: httpx.Client,
    model: str,
    examples: Sequence[Example],
    metric: str,
    max_new_tokens: int,
    concurrency: int = 8,
    progress: Callable[[], None] | None = None,
) -> ServedScore:
    """Ask every example (up to `concurrency` requests at once, so the engine batches them)
    and score the answers with `metric`."""
    scorer = SCORERS[metric]

    def one(example: Example) -> str:
        answer = ask(client, model, example, max_new_tokens)
        if progress is not None:
            progress()
        return answer

    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, examples))
    scores = [scorer(a, e.answer) for a, e in zip(answers, examples, strict=True)]
    return ServedScore(model, sum(scores) / len(scores), answers, scores)
