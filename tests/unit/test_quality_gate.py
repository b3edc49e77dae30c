"""The quality gate at publish: an adapter must beat its few-shot baseline (manifest.json
held-out scores) by --min-gain; otherwise it is refused with the numbers, and --force
publishes it with who forced it recorded in the catalog (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.adapters.catalog import Catalog
from loraplex.adapters.manifest import AdapterManifest, BaseModelInfo, DatasetInfo, sha256_file
from loraplex.adapters.quality_gate import QualityGateRefused, judge
from loraplex.adapters.quality_records import version_quality
from loraplex.adapters.refs import parse_registry_name
from tests.unit.registry_helpers import make_adapter_dir, make_base_dir
from tests.unit.test_registry_cli import listing, run


def manifest(scores: dict[str, float] | None, examples: int = 40) -> dict:
    return {
        "eval": scores or {},
        "training_config": {"eval": {"metric": "exact_match"}},
        "dataset": {"eval_examples": examples},
    }


# (case, scores, min_gain, refused?, text the decision or refusal must contain)
CASES = [
    ("better", {"base": 0.1, "base_few_shot_3": 0.5, "adapter": 0.9}, 0.0, False, "+40.0 points"),
    ("equal-is-not-worse", {"base_few_shot_3": 0.5, "adapter": 0.5}, 0.0, False, "+0.0 points"),
    (
        "worse",
        {"base": 0.1, "base_few_shot_3": 0.6, "adapter": 0.45},
        0.0,
        True,
        "exact_match on 40 held-out examples: adapter 45.0%, base_few_shot_3 60.0%, base 10.0%; "
        "gain -15.0 points, required +0.0 points",
    ),
    (
        "below-min-gain",
        {"base_few_shot_3": 0.5, "adapter": 0.52},
        0.05,
        True,
        "gain +2.0 points, required +5.0 points (--min-gain 0.05)",
    ),
    (
        "best-few-shot-counts",
        {"base_few_shot_1": 0.2, "base_few_shot_5": 0.7, "adapter": 0.6},
        0.0,
        True,
        "base_few_shot_5 70.0%",
    ),
    ("no-baseline", {"base": 0.1, "adapter": 0.9}, 0.0, True, "no few-shot baseline"),
    ("no-scores", None, 0.0, True, "eval has no `adapter` score"),
]


@pytest.mark.parametrize(
    ("scores", "min_gain", "refused", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_gate_table(scores, min_gain, refused, text):
    if refused:
        with pytest.raises(QualityGateRefused) as caught:
            judge(manifest(scores), min_gain=min_gain)
        assert text in str(caught.value) and "--force" in str(caught.value)
        forced = judge(manifest(scores), min_gain=min_gain, force=True, forced_by="ana@ci")
        assert not forced.passed and forced.forced_by == "ana@ci" and text in forced.reason
    else:
        decision = judge(manifest(scores), min_gain=min_gain)
        assert decision.passed and text in decision.reason and decision.forced_by is None


def test_no_manifest_needs_force():
    with pytest.raises(QualityGateRefused, match=r"manifest\.json: missing"):
        judge(None)
    assert judge(None, force=True, forced_by="x").forced_by == "x"


@pytest.fixture
def env(tmp_path, monkeypatch, database_url) -> Path:
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", database_url)
    monkeypatch.setenv("LORAPLEX_REGISTRY_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LORAPLEX_REGISTRY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAPLEX_BASE_MODEL", str(make_base_dir(tmp_path / "base")))
    return tmp_path


def scored_adapter(env: Path, seed: int, scores: dict[str, float]) -> Path:
    folder = make_adapter_dir(env / f"run{seed}", seed=seed)
    base = BaseModelInfo(
        id="base",
        weights_sha256=sha256_file(env / "base" / "model.safetensors"),
        tokenizer_sha256="t",
        chat_template_sha256="c",
    )
    AdapterManifest(
        name="acme/support",
        base_model=base,
        peft_config={},
        training_config={"eval": {"metric": "exact_match"}},
        dataset=DatasetInfo(train_sha256="d", train_examples=400, eval_examples=60),
        eval=scores,
    ).write(folder)
    return folder


def test_cli_refuses_a_weak_adapter_and_records_a_forced_one(env, capsys, database_url):
    good = scored_adapter(env, 1, {"base": 0.0, "base_few_shot_3": 0.3, "adapter": 0.95})
    weak = scored_adapter(env, 2, {"base": 0.0, "base_few_shot_3": 0.55, "adapter": 0.4})

    code, out, err = run(capsys, "publish", str(good), "--name", "acme/support")
    assert code == 0, err
    assert "quality gate: exact_match on 60 held-out examples: adapter 95.0%" in err

    code, out, err = run(capsys, "publish", str(weak), "--name", "acme/support")
    assert code == 2 and out == ""
    assert "does not beat its few-shot baseline" in err
    assert "adapter 40.0%, base_few_shot_3 55.0%, base 0.0%; gain -15.0 points" in err
    [adapter] = listing(capsys)
    assert [v["version"] for v in adapter["versions"]] == ["v1"]  # nothing changed
    assert len(list((env / "store" / "blobs").iterdir())) == 1  # nothing uploaded

    code, out, err = run(
        capsys, "publish", str(weak), "--name", "acme/support", "--min-gain", "-0.2"
    )
    assert code == 0, err  # a negative gain is an explicit tolerance
    code, out, err = run(capsys, "delete", "acme/support:v2", "--force")
    assert code == 0, err

    code, out, err = run(capsys, "publish", str(weak), "--name", "acme/support", "--force")
    assert code == 0, err
    assert out.startswith("published acme/support:v3")
    assert "quality gate forced by " in out and "gain -15.0 points" in out

    versions = version_quality(Catalog.open(database_url), parse_registry_name("acme/support"))
    by_number = {v.number: v for v in versions}
    assert by_number[1].gate["passed"] and by_number[1].forced_by is None
    forced = by_number[3]
    assert forced.forced_by and "@" in forced.forced_by
    assert forced.gate["forced"] and not forced.gate["passed"]
    assert (forced.gate["adapter"], forced.gate["baseline"]) == (0.4, 0.55)
    assert forced.manifest_eval == {"base": 0.0, "base_few_shot_3": 0.55, "adapter": 0.4}


def test_republishing_latest_is_not_gated_again(env, capsys):
    """Publishing what @latest already is adds nothing (it may repair the blob)."""
    folder = make_adapter_dir(env / "plain", seed=3)
    assert run(capsys, "publish", str(folder), "--name", "acme/plain", "--force")[0] == 0
    code, out, _ = run(capsys, "publish", str(folder), "--name", "acme/plain")
    assert code == 0 and out.startswith("unchanged: acme/plain:v1")
