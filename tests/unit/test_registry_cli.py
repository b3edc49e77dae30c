"""`loraplex adapters publish|list|alias|rollback|delete` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.adapters.manifest import AdapterManifest, BaseModelInfo, DatasetInfo, sha256_file
from loraplex.cli import main
from tests.unit.registry_helpers import make_adapter_dir, make_base_dir


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", f"sqlite:///{tmp_path}/loraplex.db")
    monkeypatch.setenv("LORAPLEX_REGISTRY_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LORAPLEX_REGISTRY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAPLEX_BASE_MODEL", str(make_base_dir(tmp_path / "base")))
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["adapters", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(capsys) -> list[dict]:
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    return json.loads(out)


def with_manifest(folder: Path, weights_sha256: str, base_id: str = "base") -> Path:
    base = BaseModelInfo(
        id=base_id, weights_sha256=weights_sha256, tokenizer_sha256="t", chat_template_sha256="c"
    )
    dataset = DatasetInfo(train_sha256="d", train_examples=1)
    manifest = AdapterManifest(
        name="acme/bot", base_model=base, peft_config={}, training_config={}, dataset=dataset
    )
    manifest.write(folder)
    return folder


def test_user_flow_publish_alias_rollback_delete(env, capsys):
    v1 = make_adapter_dir(env / "v1", seed=1)
    v2 = make_adapter_dir(env / "v2", seed=2)
    # Generated adapters have no held-out scores: the quality gate lets them in only forced.
    code, out, err = run(capsys, "publish", str(v1), "--name", "acme/bot", "--force")
    assert code == 0, err
    assert out.startswith("published acme/bot:v1 (@latest) lpx-")
    assert "uploading" in err  # progress goes to stderr
    assert run(capsys, "publish", str(v2), "--name", "acme/bot", "--force")[0] == 0
    code, out, _ = run(capsys, "publish", str(v2), "--name", "acme/bot")
    assert (code, out.strip()) == (0, "unchanged: acme/bot:v2 (@latest) already has this content")

    [adapter] = listing(capsys)
    assert adapter["name"] == "acme/bot" and adapter["tenant"] == "acme"
    assert adapter["aliases"] == {"latest": 2}
    assert [v["version"] for v in adapter["versions"]] == ["v1", "v2"]

    assert run(capsys, "alias", "acme/bot@stable", "v1")[1].strip() == "acme/bot@stable → v1"
    code, _, err = run(capsys, "delete", "acme/bot:v1")
    assert code == 2 and "in use by @stable" in err
    code, out, _ = run(capsys, "rollback", "acme/bot")
    assert (code, out.strip()) == (0, "acme/bot@latest → v1 (was v2)")
    code, _, err = run(capsys, "rollback", "acme/bot")
    assert code == 2 and "no older version" in err

    assert run(capsys, "delete", "acme/bot:v2")[0] == 0  # nothing points at v2 now
    code, out, err = run(capsys, "delete", "acme/bot:v1", "--force")
    assert code == 0 and "@latest removed" in err and "@stable removed" in err
    # The last version takes the entry with it (tests/unit/test_registry_lifecycle.py).
    assert "no longer in the registry" in out
    assert listing(capsys) == []
    assert not list((env / "store" / "blobs").iterdir())  # unreferenced blobs are deleted


def test_list_by_tenant(env, capsys):
    for name, seed in (("acme/a", 1), ("globex/b", 2)):
        assert (
            run(
                capsys,
                "publish",
                str(make_adapter_dir(env / name, seed)),
                "--name",
                name,
                "--force",
            )[0]
            == 0
        )
    assert [a["name"] for a in listing(capsys)] == ["acme/a", "globex/b"]
    code, out, _ = run(capsys, "list", "--tenant", "globex")
    assert code == 0 and "globex/b" in out and "acme/a" not in out


# (case, how to break a good adapter folder, text the error must contain)
REJECTIONS = [
    (
        "no-weights",
        lambda d: (d / "adapter_model.safetensors").unlink(),
        "adapter_model.safetensors: missing",
    ),
    (
        "pickled-weights",
        lambda d: (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01."),  # pickle of 1
        "adapter_model.bin: pickled weights are refused",
    ),
    (
        "pickled-instead-of-safetensors",
        lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.pt"),
        "adapter_model.pt: pickled weights are refused",
    ),
    ("no-config", lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    (
        "bad-json",
        lambda d: (d / "adapter_config.json").write_text("{"),
        "adapter_config.json: unreadable JSON",
    ),
    (
        "rank-too-big",
        lambda d: _config(d, r=64),
        "adapter_config.json: r: r=64 is greater than max_lora_rank=16",
    ),
    ("dora", lambda d: _config(d, use_dora=True), "use_dora"),
    (
        "unknown-module",
        lambda d: _config(d, target_modules=["q_proj", "gate_proj"]),
        "['gate_proj'] are not linear modules",
    ),
    (
        "wrong-base",
        lambda d: with_manifest(d, "0" * 64),
        "manifest.json: base_model: adapter was trained on base",
    ),
    ("bad-manifest", lambda d: (d / "manifest.json").write_text("{}"), "manifest.json: invalid"),
    (
        "not-lora-weights",
        lambda d: (d / "adapter_model.safetensors").write_bytes(b"junk"),
        "unreadable safetensors",
    ),
]


def _config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("breakage", "message"), [c[1:] for c in REJECTIONS], ids=[c[0] for c in REJECTIONS]
)
def test_rejected_publish_says_why_and_changes_nothing(env, capsys, breakage, message):
    folder = make_adapter_dir(env / "bad", seed=1)
    breakage(folder)
    code, out, err = run(capsys, "publish", str(folder), "--name", "acme/bot")
    assert code == 2
    assert message in err, err
    assert out == ""
    assert listing(capsys) == []
    assert not (env / "store" / "blobs").exists()


def test_publish_accepts_a_manifest_for_the_served_base(env, capsys):
    folder = with_manifest(
        make_adapter_dir(env / "ok", seed=1), sha256_file(env / "base/model.safetensors")
    )
    code, _, err = run(capsys, "publish", str(folder), "--name", "acme/bot", "--force")
    assert code == 0, err
    [adapter] = listing(capsys)
    assert adapter["versions"][0]["version"] == "v1"


def test_size_limit(env, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_REGISTRY_MAX_ADAPTER_MIB", "1")
    # 2 MiB of config (the files a version carries count; a pickled .bin would be refused).
    folder = make_adapter_dir(env / "big", seed=1, rank=16, notes="x" * (2 << 20))
    code, _, err = run(capsys, "publish", str(folder), "--name", "acme/bot")
    assert code == 2 and "over the 1 MiB limit" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["publish", "DIR", "--name", "bot"], "no tenant"),
        (["publish", "DIR", "--name", "acme/../x"], "'..'"),
        (["alias", "acme/bot", "v1"], "expected tenant/name@alias"),
        (["alias", "acme/bot@stable", "one"], "invalid version"),
        (["delete", "acme/bot@stable"], "name a version"),
        (["delete", "acme/nothing"], "not in the registry"),
        (["rollback", "acme/nothing"], "not in the registry"),
        (["publish", "/nonexistent", "--name", "acme/x"], "not a folder"),
    ],
)
def test_cli_errors_name_what_is_wrong(env, capsys, argv, message):
    argv = [str(make_adapter_dir(env / "a", 1)) if a == "DIR" else a for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err, err


def test_unusable_database_exits_3(env, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", f"sqlite:///{env}")  # a folder, not a file
    code, _, err = run(capsys, "list")
    assert code == 3 and "catalog database unavailable" in err
