"""Every command's settings flags come from ServeSettings: help with the LORAPLEX_* variable
and the default, types and choices from the field, booleans as switches; and the model cache
setting decides where `loraplex model pull` writes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from loraplex.base_model import COMPLETE_MARKER, embedded_model_dir, verify_model_dir
from loraplex.cli import build_parser, main
from loraplex.cli_flags import settings_from_args
from loraplex.settings import ServeSettings


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """(command words, parser) for every leaf command of the `loraplex` parser."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, child in action.choices.items():
            yield from commands(child, (*path, name))


def settings_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest in ServeSettings.model_fields}


ALL_COMMANDS = dict(commands(build_parser()))


def test_commands_have_the_settings_they_read() -> None:
    flags = {" ".join(words): set(settings_actions(p)) for words, p in ALL_COMMANDS.items()}
    # Every setting but the secrets, which never get a flag (a command line shows in `ps`).
    secrets = {"admin_key", "backend_api_key"}
    assert flags["serve"] == set(ServeSettings.model_fields) - secrets
    assert flags["model pull"] == {"model_cache"}
    assert flags["adapters demo"] == {"base_model", "model_cache", "adapters_dir"}
    assert {"database_url", "registry_store", "base_model", "model_cache"} <= flags[
        "adapters publish"
    ]
    for command in ("tenants create", "keys list", "quotas set"):
        assert flags[command] == {"database_url"}


@pytest.mark.parametrize("words", sorted(ALL_COMMANDS), ids=" ".join)
def test_every_settings_flag_documents_its_variable_and_default(words: tuple[str, ...]) -> None:
    for name, action in settings_actions(ALL_COMMANDS[words]).items():
        field = ServeSettings.model_fields[name]
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        assert action.help is not None
        first_sentence = (field.description or "").split()[:3]
        assert action.help.startswith(" ".join(first_sentence)), name
        assert f"[env LORAPLEX_{name.upper()}; default " in action.help, name


def test_help_shows_defaults_as_a_user_writes_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "[env LORAPLEX_PORT; default 8000]" in text
    assert "[env LORAPLEX_ALLOW_OPEN_ACCESS; default false]" in text
    assert "[env LORAPLEX_MODEL_CACHE; default ~/.cache/loraplex/models]" in text
    assert "[env LORAPLEX_BACKEND_URL; default '']" in text
    assert "--allow-open-access, --no-allow-open-access" in text


def parse(*argv: str) -> ServeSettings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_boolean_settings_are_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAPLEX_ALLOW_OPEN_ACCESS", raising=False)
    assert parse().allow_open_access is False
    assert parse("--allow-open-access").allow_open_access is True
    monkeypatch.setenv("LORAPLEX_ALLOW_OPEN_ACCESS", "true")
    assert parse().allow_open_access is True  # left out: the variable decides
    assert parse("--no-allow-open-access").allow_open_access is False  # the flag wins


def test_a_switch_takes_no_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", "--allow-open-access", "true"])
    assert caught.value.code == 2
    assert "unrecognized arguments: true" in capsys.readouterr().err


def test_flags_are_typed_and_override_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAPLEX_PORT", "9000")
    monkeypatch.setenv("LORAPLEX_MAX_LORA_RANK", "32")
    settings = parse("--port", "9100", "--model-cache", str(tmp_path))
    assert (settings.port, settings.max_lora_rank, settings.model_cache) == (9100, 32, tmp_path)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--cpu-lora-kernels", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def _link_pulled_model(model_cache: Path) -> Path:
    """The pulled embedded model, hard-linked into `model_cache` (no copy, no re-pull)."""
    source = embedded_model_dir(Path.home() / ".cache" / "loraplex" / "models")
    if verify_model_dir(source) is not None:
        pytest.skip("run `loraplex model pull` first")
    target = embedded_model_dir(model_cache)
    target.mkdir(parents=True)
    for file in source.iterdir():
        os.link(file, target / file.name)
    return target


@pytest.mark.parametrize("how", ["variable", "flag"])
def test_model_pull_writes_into_the_model_cache(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "models"
    target = _link_pulled_model(cache)
    monkeypatch.delenv("LORAPLEX_MODEL_CACHE", raising=False)
    if how == "variable":
        monkeypatch.setenv("LORAPLEX_MODEL_CACHE", str(cache))
        argv = ["model", "pull"]
    else:
        argv = ["model", "pull", "--model-cache", str(cache)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(target)  # verified there, not re-pulled
    assert (target / COMPLETE_MARKER).is_file()


@pytest.mark.parametrize(
    ("argv", "where"),
    [
        (["--admin-key", "s3cret-value"], "LORAPLEX_ADMIN_KEY or LORAPLEX_ADMIN_KEY_FILE"),
        (["--admin-key=s3cret-value"], "LORAPLEX_ADMIN_KEY or LORAPLEX_ADMIN_KEY_FILE"),
        (["--backend-api-key", "s3cret-value"], "LORAPLEX_BACKEND_API_KEY"),
    ],
)
def test_a_secret_given_as_a_flag_is_refused_without_echoing_it(
    argv: list[str], where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "is not accepted" in err and where in err
    assert "s3cret-value" not in err


def test_the_admin_key_comes_from_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LORAPLEX_ADMIN_KEY", raising=False)
    key_file = tmp_path / "admin-key"
    key_file.write_text("the-admin-key\n")  # as `echo KEY > file` writes it
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY_FILE", str(key_file))
    assert parse().admin_key.get_secret_value() == "the-admin-key"
    assert parse("--admin-key-file", str(key_file)).admin_key.get_secret_value() == "the-admin-key"

    missing = tmp_path / "no-such-file"
    with pytest.raises(SystemExit) as exit_info:
        parse("--admin-key-file", str(missing))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"admin_key_file {missing} cannot be read" in err and "Traceback" not in err

    monkeypatch.setenv("LORAPLEX_ADMIN_KEY", "also-set")
    with pytest.raises(SystemExit):
        parse()
    assert "set admin_key or admin_key_file, not both" in capsys.readouterr().err
