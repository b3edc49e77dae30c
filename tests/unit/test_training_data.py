"""Training data: formats, errors naming file and line, length limits, and the loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from loraplex.base_model import embedded_model_dir, verify_model_dir
from loraplex.training.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    read_examples,
    tokenize_example,
    tokenize_examples,
)
from loraplex.training.trainer import collate

needs_model = pytest.mark.skipif(
    verify_model_dir(embedded_model_dir()) is not None, reason="run `loraplex model pull` first"
)

# (case, file text, message fragment; the bad line is line 2)
BAD_CASES = [
    ("invalid_json", '{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', ":2: invalid JSON"),
    ("not_object", '{"prompt": "a", "completion": "b"}\n[1, 2]\n', ":2: expected a JSON object"),
    (
        "unknown_keys",
        '{"prompt": "a", "completion": "b"}\n{"text": "a"}\n',
        ":2: expected {'messages'",
    ),
    (
        "completion_missing",
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
        ":2: 'prompt' and 'completion' must both be strings",
    ),
    (
        "bad_role",
        '{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "bot", "content": "x"}]}\n',
        ":2: messages[0]",
    ),
    (
        "last_not_assistant",
        '{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "user", "content": "x"}]}\n',
        ":2: the last message must be the assistant's",
    ),
    (
        "no_user",
        '{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n',
        ":2: no user message",
    ),
]


@pytest.mark.parametrize(("case", "text", "fragment"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_malformed_line_names_file_and_line(
    tmp_path: Path, case: str, text: str, fragment: str
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert f"{path}{fragment}" in str(info.value)


def test_empty_dataset_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_examples(path)


def test_both_formats_read_the_same(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    chat = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path.write_text(
        json.dumps({"prompt": "Q", "completion": "A"}) + "\n\n" + json.dumps(chat) + "\n"
    )
    first, second = read_examples(path)
    assert first.messages == second.messages
    assert (first.source, second.source) == (f"{path}:1", f"{path}:3")
    assert first.prompt == [{"role": "user", "content": "Q"}] and first.answer == "A"


@pytest.fixture(scope="module")
def tokenizer() -> AutoTokenizer:
    if verify_model_dir(embedded_model_dir()) is not None:
        pytest.skip("run `loraplex model pull` first")
    return AutoTokenizer.from_pretrained(embedded_model_dir())


def example(*turns: tuple[str, str]) -> Example:
    return Example([{"role": r, "content": c} for r, c in turns], "test:1")


@needs_model
def test_prompt_tokens_carry_no_loss(tokenizer: AutoTokenizer) -> None:
    ex = example(
        ("user", "Route this ticket: my card was charged twice."), ("assistant", "billing")
    )
    tokenized = tokenize_example(tokenizer, ex)
    prompt_ids = tokenizer(
        tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    # The prompt is tokenized exactly as the server tokenizes the request...
    assert tokenized.input_ids[: len(prompt_ids)] == prompt_ids
    # ...and none of it is a target; every answer token is.
    assert tokenized.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer = tokenized.labels[len(prompt_ids) :]
    assert IGNORE_INDEX not in answer
    assert tokenizer.decode(answer) == "billing<|im_end|>\n"


@needs_model
def test_every_assistant_turn_is_learned_and_only_those(tokenizer: AutoTokenizer) -> None:
    ex = example(
        ("system", "Be terse."),
        ("user", "2+2?"),
        ("assistant", "4"),
        ("user", "3+3?"),
        ("assistant", "6"),
    )
    tokenized = tokenize_example(tokenizer, ex)
    learned = [
        t
        for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(learned) == "4<|im_end|>\n6<|im_end|>\n"
    full = tokenizer.apply_chat_template(ex.messages, tokenize=False)
    assert tokenizer.decode(tokenized.input_ids) == full


@needs_model
def test_padding_carries_no_loss(tokenizer: AutoTokenizer) -> None:
    short = tokenize_example(tokenizer, example(("user", "hi"), ("assistant", "yes")))
    long = tokenize_example(tokenizer, example(("user", "hello " * 20), ("assistant", "no")))
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    padded = batch["attention_mask"] == 0
    assert padded.any()
    assert torch.all(batch["labels"][padded] == IGNORE_INDEX)
    answers = int((batch["labels"] != IGNORE_INDEX).sum())
    assert answers == sum(sum(label != IGNORE_INDEX for label in t.labels) for t in (short, long))


@needs_model
def test_too_long_examples_are_skipped_or_truncated_and_counted(tokenizer: AutoTokenizer) -> None:
    examples = [
        example(("user", "short"), ("assistant", "ok")),
        example(("user", "word " * 200), ("assistant", "long answer")),
    ]
    limit = len(tokenize_example(tokenizer, examples[0]).input_ids) + 5
    kept, report = tokenize_examples(tokenizer, examples, limit, "skip")
    assert (len(kept), report.skipped, report.truncated) == (1, 1, 0)
    # Truncating the long one would cut off its whole answer: skipped, not trained on.
    kept, report = tokenize_examples(tokenizer, examples, limit, "truncate")
    assert (len(kept), report.skipped, report.truncated) == (1, 1, 0)
    answer_first = [example(("user", "q"), ("assistant", "a long answer " * 50))]
    kept, report = tokenize_examples(tokenizer, answer_first, limit, "truncate")
    assert report.truncated == 1 and len(kept[0].input_ids) == limit
