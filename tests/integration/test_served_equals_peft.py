"""What vLLM serves for an adapter is what peft computes for it (float32, greedy)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.integration.conftest import BASE_NAME, Server

pytestmark = pytest.mark.integration

TOKENS = 16
PROMPTS = ["What is the capital of France?", "Name a large animal."]


def prompt_ids(tokenizer: AutoTokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def peft_greedy(model: torch.nn.Module, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False, pad_token_id=2
        )
    return out[0, len(ids) :].tolist()


def served_greedy(server: Server, model: str, ids: list[int]) -> list[int]:
    response = server.client.completions.create(
        model=model,
        prompt=ids,
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    return list(response.choices[0].model_extra["token_ids"])


@pytest.fixture(scope="module")
def tokenizer(server: Server) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(server.model_dir)


@pytest.mark.parametrize("adapter", ["demo/alpha", "demo/beta"])
def test_served_tokens_equal_peft(server: Server, tokenizer: AutoTokenizer, adapter: str) -> None:
    base = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, server.adapters_dir / adapter).eval()
    for text in PROMPTS:
        ids = prompt_ids(tokenizer, text)
        expected = peft_greedy(model, ids)
        assert served_greedy(server, adapter, ids) == expected
        # And the adapter matters: the base model says something else.
        assert served_greedy(server, BASE_NAME, ids) != expected
