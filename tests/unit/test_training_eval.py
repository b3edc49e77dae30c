"""`loraplex eval`: the printed scores, and with --write-manifest the manifest, agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.adapters.manifest import read_manifest, sha256_file
from loraplex.base_model import embedded_model_dir, verify_model_dir
from loraplex.cli import main
from loraplex.training.config import TrainConfig
from loraplex.training.run import train_task
from tests.unit.tiny_llama import TASK, build_tiny_llama

pytestmark = pytest.mark.skipif(
    verify_model_dir(embedded_model_dir()) is not None, reason="run `loraplex model pull` first"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny adapter whose manifest holds the training run's scores (1 shot, 4 examples)."""
    folder = tmp_path_factory.mktemp("eval")
    config = TrainConfig(
        name="tasks/tiny",
        base_model=str(build_tiny_llama(folder / "tiny-llama")),
        train_data=(TASK / "train.jsonl").resolve(),
        eval_data=(TASK / "eval.jsonl").resolve(),
        output_dir=folder / "run",
        cpu_threads=1,
        optim={"max_steps": 2, "batch_size": 4, "lr": 1e-2},
        eval={"interval": 2, "max_examples": 4, "max_new_tokens": 4, "few_shot": 1},
    )
    return train_task(config).run_dir


def printed_scores(out: str) -> dict[str, str]:
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return {name: value for name, value in rows}


def test_write_manifest_records_what_was_printed(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = read_manifest(trained)
    assert set(before.eval) == {"base", "base_few_shot_1", "adapter"}
    data = tmp_path / "other-eval.jsonl"
    data.write_text("\n".join((TASK / "eval.jsonl").read_text().splitlines()[10:16]) + "\n")

    args = [
        "eval",
        str(trained),
        "--data",
        str(data),
        "--few-shot",
        "2",
        "--max-new-tokens",
        "4",
        "--max-examples",
        "5",
        "--write-manifest",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = printed_scores(captured.out)
    assert f"recorded in {trained / 'manifest.json'}" in captured.err

    after = read_manifest(trained)
    # The stale 1-shot score from training is gone; every number is this run's.
    assert set(after.eval) == set(printed) == {"base", "base_few_shot_2", "adapter"}
    assert {name: f"{value:.1%}" for name, value in after.eval.items()} == printed
    assert after.dataset.eval_sha256 == sha256_file(data)
    assert after.dataset.eval_examples == 5
    # Everything else in the manifest is untouched.
    assert after.model_dump(exclude={"eval", "dataset"}) == before.model_dump(
        exclude={"eval", "dataset"}
    )
    assert after.dataset.train_sha256 == before.dataset.train_sha256


def test_eval_without_write_manifest_leaves_it_alone(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (trained / "manifest.json").read_text()
    args = [
        "eval",
        str(trained),
        "--data",
        str(TASK / "eval.jsonl"),
        "--max-examples",
        "2",
        "--max-new-tokens",
        "2",
    ]
    assert main(args) == 0
    assert set(printed_scores(capsys.readouterr().out)) == {"base", "adapter"}
    assert (trained / "manifest.json").read_text() == before


@pytest.mark.parametrize(
    ("case", "extra", "fragment"),
    [
        (
            "other_metric",
            ["--metric", "json_match"],
            "records exact_match scores; cannot write json_match",
        ),
        ("no_manifest", [], "no manifest to write the scores into"),
    ],
)
def test_write_manifest_refusals_exit_2_and_change_nothing(
    trained: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    extra: list[str],
    fragment: str,
) -> None:
    adapter = trained
    if case == "no_manifest":
        adapter = tmp_path / "bare"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(
            json.dumps(json.loads((trained / "adapter_config.json").read_text()))
        )
    before = {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    args = ["eval", str(adapter), "--data", str(TASK / "eval.jsonl"), "--write-manifest", *extra]
    assert main(args) == 2
    assert fragment in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()} == before
