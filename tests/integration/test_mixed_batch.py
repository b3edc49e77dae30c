"""Requests for different adapters share one vLLM batch without changing each other's answers."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.integration.conftest import BASE_NAME, Server

pytestmark = pytest.mark.integration

PROMPTS = [
    "Write one sentence about the ocean.",
    "List three fruits.",
    "Explain what a CPU does.",
]


async def _complete(client: openai.AsyncOpenAI, model: str, prompt: str) -> str:
    response = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=32,
        temperature=0,
        seed=1234,
    )
    return response.choices[0].message.content or ""


def test_concurrent_mixed_requests_equal_solo_requests(server: Server) -> None:
    models = [BASE_NAME, *server.adapter_names]
    jobs = [(model, prompt) for prompt in PROMPTS for model in models]

    async def run() -> tuple[list[str], list[str]]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        solo = [await _complete(client, m, p) for m, p in jobs]
        together = await asyncio.gather(*(_complete(client, m, p) for m, p in jobs))
        await client.close()
        return solo, list(together)

    solo, together = asyncio.run(run())
    assert together == solo
    for index in range(0, len(jobs), len(models)):
        answers = solo[index : index + len(models)]
        assert len(set(answers)) == len(models), f"base and adapters agreed: {answers}"


def test_bad_request_in_a_batch_does_not_break_the_others(server: Server) -> None:
    async def run() -> tuple[list[object], str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        expected = await _complete(client, "demo/alpha", PROMPTS[0])
        results = await asyncio.gather(
            _complete(client, "demo/alpha", PROMPTS[0]),
            client.chat.completions.create(  # longer than the context: rejected by vLLM
                model="demo/beta",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=10**6,
            ),
            _complete(client, "demo/../../etc", PROMPTS[0]),
            _complete(client, BASE_NAME, PROMPTS[1]),
            return_exceptions=True,
        )
        await client.close()
        return results, expected

    results, expected = asyncio.run(run())
    assert results[0] == expected
    assert isinstance(results[1], openai.BadRequestError)
    assert isinstance(results[2], openai.BadRequestError)
    assert isinstance(results[3], str) and results[3]
