"""Training config: the YAML schema, its errors (file, line, key) and the resolved copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraplex.training.config import (
    LLAMA_PROJECTIONS,
    ConfigError,
    TrainConfig,
    load_config,
    load_configs,
)

GOOD = "name: tasks/demo\ntrain_data: data/train.jsonl\nlora:\n  r: 16\n"

# (case, yaml text, expected message fragment)
BAD_CASES = [
    ("unknown_top_key", GOOD + "learning_rate: 0.1\n", ":5: unknown key 'learning_rate'"),
    (
        "unknown_nested_key",
        "name: a\ntrain_data: t.jsonl\noptim:\n  lr: 0.1\n  sheduler: cosine\n",
        ":5: unknown key 'optim.sheduler'",
    ),
    ("missing_train_data", "name: a\n", "missing required key 'train_data'"),
    (
        "bad_value",
        "name: a\ntrain_data: t.jsonl\noptim:\n  lr: -1\n",
        ":4: optim.lr: Input should be greater than 0",
    ),
    (
        "bad_choice",
        "name: a\ntrain_data: t.jsonl\noptim:\n  schedule: wavy\n",
        ":4: optim.schedule",
    ),
    ("not_a_mapping", "- a\n- b\n", "expected a mapping"),
    ("missing_train_file", "name: a\ntrain_data: nope.jsonl\n", ":2: train_data: no such file"),
    ("missing_eval_file", GOOD + "eval_data: e.jsonl\n", ":5: eval_data: no such file"),
    ("base_not_a_model", GOOD + "base_model: /nonexistent\n", ":5: base_model: not a model folder"),
    ("bad_yaml", "name: [a\n", "invalid YAML"),
]


def write(tmp_path: Path, text: str, name: str = "train.yaml") -> Path:
    """Write a config, and GOOD's training data beside it."""
    path = tmp_path / name
    (path.parent / "data").mkdir(parents=True, exist_ok=True)
    (path.parent / "data" / "train.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    path.write_text(text)
    return path


@pytest.mark.parametrize(("case", "text", "fragment"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_names_file_line_and_key(
    tmp_path: Path, case: str, text: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD, "task/train.yaml"))
    assert config.train_data == tmp_path / "task" / "data" / "train.jsonl"
    assert config.lora.r == 16
    assert config.lora.target_modules == list(LLAMA_PROJECTIONS)
    assert config.run_dir == Path("runs/tasks/demo")


def test_field_docs_come_from_docstrings() -> None:
    assert "Seed" in (TrainConfig.model_fields["seed"].description or "")


def test_resolved_config_is_written_and_reloads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    written = config.write_resolved(tmp_path / "run")
    assert TrainConfig.model_validate(yaml.safe_load(written.read_text())) == config


def test_tasks_file_lists_several(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "a/train.yaml")
    write(tmp_path, GOOD.replace("tasks/demo", "tasks/other"), "b/train.yaml")
    tasks = write(tmp_path, "tasks:\n  - a/train.yaml\n  - b/train.yaml\n", "tasks.yaml")
    assert [c.name for c in load_configs(tasks)] == ["tasks/demo", "tasks/other"]
    broken = write(tmp_path, "tasks:\n  - a/train.yaml\n  - c/train.yaml\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"c/train\.yaml: cannot read"):
        load_configs(broken)
