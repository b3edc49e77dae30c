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
    # A base model folder that cannot load: the data error must come first.
    (tmp_path / "broken-model").mkdir()
    (tmp_path / "broken-model" / "config.json").write_text("{}")
    config.write_text(
        f"name: a\ntrain_data: t.jsonl\nbase_model: {tmp_path / 'broken-model'}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    assert main(["train", str(config)]) == 2
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err


def test_eval_without_an_adapter_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "e.jsonl")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_train_missing_files_exit_2_naming_the_key_before_any_task_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "t.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    good = f"name: a\ntrain_data: t.jsonl\noutput_dir: {tmp_path / 'run-a'}\n"
    (tmp_path / "a.yaml").write_text(good)
    (tmp_path / "b.yaml").write_text(f"name: b\ntrain_data: t.jsonl\nbase_model: {tmp_path}\n")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks: [a.yaml, b.yaml]\n")
    assert main(["train", str(tasks)]) == 2
    assert f"{tmp_path / 'b.yaml'}:3: base_model: not a model folder" in capsys.readouterr().err
    # The first task was not trained: every task's config is checked first.
    assert not (tmp_path / "run-a").exists()


def test_every_config_key_is_a_train_flag_overriding_the_file(tmp_path: Path) -> None:
    from loraplex.cli import _config_overrides, build_parser
    from loraplex.training.config import config_keys, load_configs

    assert {"seed", "optim.lr", "lora.target_modules", "eval.few_shot"} <= set(config_keys())
    (tmp_path / "t.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    config = tmp_path / "train.yaml"
    config.write_text("name: a\ntrain_data: t.jsonl\neval_data: t.jsonl\noptim:\n  lr: 0.5\n")
    args = build_parser().parse_args(
        [
            "train",
            str(config),
            "--optim.lr",
            "1e-3",
            "--lora.target_modules",
            "[q_proj, v_proj]",
            "--eval_data",
            "null",
            "--seed",
            "7",
            "--optim.max_steps",
            "3",
        ]
    )
    (loaded,) = load_configs(config, _config_overrides(args))
    assert loaded.optim.lr == 0.001 and loaded.optim.max_steps == 3 and loaded.seed == 7
    assert loaded.lora.target_modules == ["q_proj", "v_proj"] and loaded.eval_data is None
    assert loaded.train_data == tmp_path / "t.jsonl"  # still relative to the file


# (case, flags, message fragment)
BAD_FLAGS = [
    ("bad_value", ["--optim.lr", "-1"], "--optim.lr: Input should be greater than 0"),
    (
        "bad_list",
        ["--lora.target_modules", "q_proj"],
        "--lora.target_modules: Input should be a valid list",
    ),
    (
        "missing_file",
        ["--train_data", "nope.jsonl"],
        "--train_data: no such file: nope.jsonl",
    ),
    ("not_yaml", ["--lora.target_modules", "[q_proj"], "--lora.target_modules: not a YAML value"),
]


@pytest.mark.parametrize(("case", "flags", "fragment"), BAD_FLAGS, ids=[c[0] for c in BAD_FLAGS])
def test_bad_flag_exits_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, flags: list[str], fragment: str
) -> None:
    (tmp_path / "t.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    config = tmp_path / "train.yaml"
    config.write_text(f"name: a\ntrain_data: t.jsonl\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(config), *flags]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
