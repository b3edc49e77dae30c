"""A trained example adapter learned its task and serves on vLLM as peft computes it.

Trains examples/tasks/ticket-routing on the real SmolLM2 for a few steps (once per
session), publishes the folder into the running server's adapter folder, then
scores the held-out set through the OpenAI API for the base model and the adapter.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.training.config import load_config
from loraplex.training.data import Example, read_examples
from loraplex.training.evaluate import exact_match
from loraplex.training.run import train_task
from tests.integration.conftest import BASE_NAME, Server
from tests.integration.test_served_equals_peft import peft_greedy, prompt_ids, served_greedy

pytestmark = pytest.mark.integration

TASK = Path(__file__).resolve().parents[2] / "examples" / "tasks" / "ticket-routing"
ADAPTER = "tasks/ticket-routing"
STEPS = 24
EVAL_EXAMPLES = 40
# Measured: base 0 %, adapter 100 % after 24 steps on these 40 (full integration run).
BASE_AT_MOST, ADAPTER_AT_LEAST = 0.10, 0.80
EOS = 2


@pytest.fixture(scope="session")
def trained_routing_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(TASK / "train.yaml")
    config = config.model_copy(
        update={
            "output_dir": tmp_path_factory.mktemp("runs") / "ticket-routing",
            # The held-out metric is measured through the API below, not in process.
            "eval_data": None,
            # One thread: the idle vLLM engine of the session shares these cores.
            "cpu_threads": 1,
            "optim": config.optim.model_copy(update={"max_steps": STEPS}),
        }
    )
    return train_task(config).run_dir


@pytest.fixture(scope="module")
def published(trained_routing_adapter: Path, server: Server) -> str:
    target = server.adapters_dir.joinpath(*ADAPTER.split("/"))
    shutil.copytree(trained_routing_adapter, target, dirs_exist_ok=True)
    return ADAPTER


def served_answer(server: Server, model: str, example: Example) -> str:
    response = server.client.chat.completions.create(
        model=model, messages=example.prompt, max_tokens=8, temperature=0
    )
    return response.choices[0].message.content or ""


def api_score(server: Server, model: str, examples: list[Example]) -> float:
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda e: served_answer(server, model, e), examples))
    return sum(exact_match(a, e.answer) for a, e in zip(answers, examples, strict=True)) / len(
        examples
    )


def test_adapter_learned_its_task_through_the_api(server: Server, published: str) -> None:
    examples = read_examples(TASK / "eval.jsonl")[:EVAL_EXAMPLES]
    base = api_score(server, BASE_NAME, examples)
    adapter = api_score(server, published, examples)
    print(f"held-out exact match through the API: base {base:.1%}, adapter {adapter:.1%}")
    assert base <= BASE_AT_MOST, f"base model scored {base:.0%}"
    assert adapter >= ADAPTER_AT_LEAST, f"adapter scored {adapter:.0%} (base {base:.0%})"


def test_served_greedy_tokens_equal_peft(server: Server, published: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    base = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, server.adapters_dir / published).eval()
    examples = read_examples(TASK / "eval.jsonl")[:2]
    texts = [e.prompt[0]["content"] for e in examples] + ["What is the capital of France?"]
    for text in texts:
        ids = prompt_ids(tokenizer, text)
        expected = peft_greedy(model, ids)
        served = served_greedy(server, published, ids)
        # Whether the stop token is reported differs between the two; the tokens before it
        # must not.
        strip = lambda tokens: tokens[: tokens.index(EOS)] if EOS in tokens else tokens  # noqa: E731
        assert strip(served) == strip(expected), text
        assert strip(served) != strip(served_greedy(server, BASE_NAME, ids)), text
