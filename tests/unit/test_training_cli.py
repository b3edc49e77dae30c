"""`loraplex train` / `loraplex eval`: bad input exits non-zero naming file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.cli import main


def test_train_unknown_key_exits_2_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("name: a\ntrain_data: t.jsonl\noptim:\n  learning_rate: 1\n")
    assert main(["train", str(config)]) == 2
    assert f"{config}:4: unknown key 'optim.learning_rate'" in capsys.readouterr().err


def test_train_malformed_data_exits_2_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q"\n')
    config = tmp_path / "train.yaml"
    # A base model folder that does not exist: the data error must come first.
    config.write_text(
        f"name: a\ntrain_data: t.jsonl\nbase_model: {tmp_path / 'nope'}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    assert main(["train", str(config)]) == 2
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err


def test_eval_without_an_adapter_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "e.jsonl")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
