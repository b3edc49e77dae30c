"""A trained example adapter learned its task and serves on vLLM as peft computes it.

Trains examples/tasks/ticket-routing on the real SmolLM2 for a few steps (once per
session), publishes the folder into the running server's adapter folder, then
scores the held-out set through the OpenAI API for the base model and the adapter.
Published into the registry, `loraplex adapters eval` through the router scores it as
`loraplex eval` (peft) does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.training.config import load_config
from loraplex.training.data import Example, read_examples
from loraplex.training.evaluate import exact_match, record_eval, score_model
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


def test_adapters_eval_through_the_router_equals_loraplex_eval(
    server: Server, trained_routing_adapter: Path, tmp_path: Path
) -> None:
    """`adapters eval` (vLLM, chat template, greedy, this engine's dtype) scores the published
    adapter as `loraplex eval` (peft, float32) does, within one example, and records it."""
    folder = shutil.copytree(trained_routing_adapter, tmp_path / "run")
    data = TASK / "eval.jsonl"
    examples = read_examples(data)[:EVAL_EXAMPLES]
    # `loraplex eval`'s adapter score (evaluate_adapter's last row), without its base and
    # few-shot passes: on 2 shared cores each pass costs minutes. The gate is not what is
    # tested here (tests/unit/test_quality_gate.py): publish is forced.
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    base = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder).eval()
    peft = score_model(model, tokenizer, examples, "exact_match", max_new_tokens=8)
    record_eval(folder, data, {"adapter": peft.score}, len(examples))
    name = "acme/ticket-routing"
    published = registry_cli(server, "publish", str(folder), "--name", name, "--force")
    assert published.returncode == 0, published.stderr

    result = registry_cli(
        server, "eval", name, "--data", str(data), "--url", server.url,
        "--max-examples", str(EVAL_EXAMPLES), "--record",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    print(f"loraplex eval (peft fp32): {peft.score:.1%}\nadapters eval (served):\n{result.stdout}")
    row = re.search(
        r"^v1\s+[\d.]+% \((\d+)/40\)\s+[\d.]+% \((\d+)/40, same examples\)", result.stdout, re.M
    )
    assert row is not None, result.stdout
    served_correct, peft_correct = int(row.group(1)), int(row.group(2))
    assert peft_correct == round(peft.score * EVAL_EXAMPLES)
    # bf16 vs fp32 can flip a near-tie; this engine runs float32 (conftest), so at most one
    # example may differ (batch composition), and the output says by how many.
    assert abs(served_correct - peft_correct) <= 1, result.stdout
    assert "asking" in result.stderr  # the progress bar

    shown = registry_cli(server, "show", name)
    assert f"served: {served_correct / EVAL_EXAMPLES:.1%} exact_match on eval.jsonl" in shown.stdout


def registry_cli(server: Server, command: str, *argv: str) -> subprocess.CompletedProcess:
    """`loraplex adapters COMMAND ...` against the session server's registry."""
    return subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "adapters", command, *argv],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
