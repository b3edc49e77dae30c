"""docs/configuration.md is what scripts/build_config_reference.py generates from
ServeSettings: a setting added, renamed or re-documented fails here until the page is
regenerated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loraplex.cli_flags import is_secret
from loraplex.settings import ServeSettings

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "scripts" / "build_config_reference.py"
PAGE = REPO / "docs" / "configuration.md"


def _generator():
    spec = importlib.util.spec_from_file_location("build_config_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_the_generated_one():
    assert PAGE.read_text() == _generator().render(), f"stale: run {_generator().COMMAND}"


def test_every_setting_has_a_row_with_its_flag_and_variable():
    rows = [
        line for line in PAGE.read_text().splitlines() if line.startswith(("| `--", "| (none)"))
    ]
    assert len(rows) == len(ServeSettings.model_fields)
    for name, row in zip(ServeSettings.model_fields, rows, strict=True):
        # Secrets have no flag (a command line shows in `ps`): only their variable.
        flag = "(none)" if is_secret(name) else f"`--{name.replace('_', '-')}`"
        assert row.startswith(f"| {flag}"), row
        assert f"`LORAPLEX_{name.upper()}`" in row


def test_defaults_do_not_name_the_generating_machine(monkeypatch, tmp_path):
    """Path defaults are written under `~`, so the page is the same for every reader."""
    monkeypatch.setenv("HOME", str(tmp_path))
    page = _generator().render()
    assert str(tmp_path) not in page
    assert "`~/.cache/loraplex/adapters`" in page
