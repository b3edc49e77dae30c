"""Task data: reading JSONL, rendering with the base model's chat template, loss masks.

Two line formats:
  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
  {"prompt": ..., "completion": ...}   (a user turn and the assistant's answer)

The base model's own chat template renders the conversation. Each assistant
turn is tokenized on its own after the tokenized prompt before it, exactly as
the server sees a prompt and then generates, and only those tokens (including
the end-of-turn token, so the model learns to stop) carry loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

IGNORE_INDEX = -100  # label value torch's cross-entropy skips
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]]
    """The whole conversation; the last message is the assistant's answer."""
    source: str
    """`file:line`, for messages about this example."""

    @property
    def prompt(self) -> list[dict[str, str]]:
        """Everything before the final answer: what a client sends."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    source: str


@dataclass
class TokenizeReport:
    kept: int = 0
    truncated: int = 0
    skipped: int = 0
    lengths: list[int] = field(default_factory=list)
    """Token length of every example before truncation."""


def _parse_line(obj: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"{where}: messages[{i}] must be {{'role': one of {list(ROLES)}, "
                    "'content': string}"
                )
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where}: no user message")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise DataError(
        f"{where}: expected {{'messages': [...]}} or {{'prompt': ..., 'completion': ...}}, "
        f"got keys {sorted(obj)}"
    )


def read_examples(path: Path) -> list[Example]:
    """Every example of a JSONL file; blank lines are allowed, malformed ones are errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        examples.append(Example(_parse_line(obj, where), where))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def render_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split the templated conversation into (text, is_assistant_answer) segments.

    Relies on the template being incremental (the rendering of a prefix of the
    conversation is a prefix of the rendering of all of it), which holds for the
    chat templates of instruct models; a template that breaks it is an error.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations incrementally")
        segments.append((prompt[len(done) :], False))
        segments.append((full[len(prompt) :], True))
        done = full
    return [(text, answer) for text, answer in segments if text]


def tokenize_example(tokenizer: Any, example: Example) -> TokenizedExample:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in render_segments(tokenizer, example.messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
    return TokenizedExample(input_ids, labels, example.source)


def tokenize_examples(
    tokenizer: Any,
    examples: list[Example],
    max_length: int,
    too_long: Literal["skip", "truncate"] = "skip",
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize with loss masks; longer examples are skipped or truncated and counted."""
    report = TokenizeReport()
    kept = []
    for example in examples:
        tokenized = tokenize_example(tokenizer, example)
        report.lengths.append(len(tokenized.input_ids))
        if len(tokenized.input_ids) > max_length:
            if too_long == "skip":
                report.skipped += 1
                continue
            tokenized.input_ids = tokenized.input_ids[:max_length]
            tokenized.labels = tokenized.labels[:max_length]
            # A truncation that cut every answer token leaves nothing to learn from.
            if all(label == IGNORE_INDEX for label in tokenized.labels):
                report.skipped += 1
                continue
            report.truncated += 1
        kept.append(tokenized)
    report.kept = len(kept)
    return kept, report
