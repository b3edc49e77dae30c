"""The test session's environment (tests/conftest.py): no developer setting, no developer cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from loraplex.settings import ServeSettings


def test_no_loraplex_variable_reaches_a_test() -> None:
    assert [name for name in os.environ if name.startswith("LORAPLEX_")] == []


def test_every_default_path_lies_in_the_sessions_own_home() -> None:
    home = Path.home()
    assert home.is_relative_to(tempfile.gettempdir()) and home.name.startswith("loraplex-tests")
    settings = ServeSettings()
    for path in (settings.model_cache, settings.adapters_dir, settings.registry_cache_dir):
        assert path.is_relative_to(home / ".cache" / "loraplex"), path
    assert settings.resolved_database_url() == f"sqlite:///{home}/.cache/loraplex/loraplex.db"
