"""vLLM compatibility rules: every rule, table-driven, with the fix in the message."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from loraplex.adapters.compat import (
    BaseModelRef,
    IncompatibleAdapter,
    check_adapter_config,
    ensure_servable,
)
from loraplex.adapters.manifest import (
    AdapterManifest,
    BaseModelInfo,
    DatasetInfo,
    read_manifest,
)

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOOD = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
    "use_dora": False,
    "modules_to_save": None,
    "use_rslora": True,
}
SMOL = BaseModelRef("SmolLM2-135M-Instruct", "aaaa")

# (case, changes to GOOD, extra kwargs, rule, words the message must contain)
BAD_CASES = [
    ("prompt_tuning", {"peft_type": "PROMPT_TUNING"}, {}, "peft_type", "train a LoRA adapter"),
    ("prefix_tuning", {"peft_type": "PREFIX_TUNING"}, {}, "peft_type", "prompt/prefix tuning"),
    (
        "modules_to_save",
        {"modules_to_save": ["lm_head"]},
        {},
        "modules_to_save",
        "remove modules_to_save",
    ),
    ("dora", {"use_dora": True}, {}, "dora", "set use_dora to false"),
    ("bias_all", {"bias": "all"}, {}, "bias", "set bias to 'none'"),
    ("bias_lora_only", {"bias": "lora_only"}, {}, "bias", "set bias to 'none'"),
    ("rank_not_servable", {"r": 12}, {}, "rank", "use one of"),
    ("rank_over_max", {"r": 32}, {}, "max_rank", "--max-lora-rank 32"),
    ("rank_pattern", {"rank_pattern": {"q_proj": 4}}, {}, "rank_pattern", "use one r"),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": 4}}, {}, "alpha_pattern", "use one r"),
    ("no_targets", {"target_modules": []}, {}, "target_modules", "list the projections"),
    (
        "pattern_targets",
        {"target_modules": "all-linear"},
        {},
        "target_modules",
        "list module names",
    ),
    (
        "unknown_target",
        {"target_modules": ["q_proj", "qkv_proj"]},
        {"known_modules": LLAMA},
        "target_modules",
        "['qkv_proj']",
    ),
    (
        "base_hash",
        {},
        {"adapter_base": SMOL, "served_base": BaseModelRef(SMOL.id, "bbbb")},
        "base_model",
        "retrain on the served base",
    ),
    (
        "base_name",
        {},
        {"adapter_base": SMOL, "served_base": BaseModelRef("Llama-3-8B", "aaaa")},
        "base_model",
        "Llama-3-8B",
    ),
]


def test_good_config_passes() -> None:
    kwargs = {"known_modules": LLAMA, "adapter_base": SMOL, "served_base": SMOL}
    assert check_adapter_config(GOOD, max_lora_rank=16, **kwargs) == []
    ensure_servable(GOOD, max_lora_rank=16, **kwargs)


@pytest.mark.parametrize(
    ("case", "changes", "kwargs", "rule", "fix"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
def test_rule_rejects_with_a_fix(
    case: str, changes: dict, kwargs: dict, rule: str, fix: str
) -> None:
    config = {**GOOD, **changes}
    problems = check_adapter_config(config, max_lora_rank=16, **kwargs)
    assert [p.rule for p in problems] == [rule]
    assert fix in problems[0].message
    with pytest.raises(IncompatibleAdapter, match="not servable"):
        ensure_servable(config, max_lora_rank=16, **kwargs)


def test_every_problem_is_reported_at_once() -> None:
    config = {**GOOD, "use_dora": True, "bias": "all", "r": 64}
    rules = {p.rule for p in check_adapter_config(config, max_lora_rank=16)}
    assert rules == {"dora", "bias", "max_rank"}


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = AdapterManifest(
        name="tasks/x",
        base_model=BaseModelInfo(
            id="SmolLM2-135M-Instruct",
            weights_sha256="a" * 64,
            tokenizer_sha256="b" * 64,
            chat_template_sha256="c" * 64,
        ),
        peft_config=GOOD,
        training_config={"seed": 0},
        dataset=DatasetInfo(train_sha256="d" * 64, train_examples=10),
        eval={"base": 0.0, "adapter": 0.9},
    )
    manifest.write(tmp_path)
    again = read_manifest(tmp_path)
    assert again == manifest
    assert again.created_at and again.loraplex_version


def test_adapters_package_imports_no_other_part() -> None:
    """Dependencies point one way: adapters/ must not import training, serving or router."""
    sources = sorted((Path(__file__).resolve().parents[2] / "adapters").glob("*.py"))
    assert any(p.name == "compat.py" for p in sources)
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            for name in names:
                assert not name.startswith(
                    ("loraplex.training", "loraplex.serving", "loraplex.router")
                ), f"{path} imports {name}"
