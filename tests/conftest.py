"""Hermetic tests: no test reads the developer's loraplex settings or writes to their cache.

Before collection (module-level checks such as "is the base model pulled" and the fused
kernel's load run while tests are imported) and for the whole session:

- every `LORAPLEX_*` variable is removed, so each setting is its default or what a test sets;
- HOME is a fresh folder of the session, so every default path under `~/.cache/loraplex`
  (adapters, registry store and cache, the SQLite database, compiled kernels) lies in it
  and goes with it; the engines `loraplex serve` starts inherit it;
- two build artifacts are taken from the developer's cache when it holds them, hard-linked
  (copied across file systems) and never written back: the pulled embedded model (a pull
  takes ~3 min on 2 busy cores; its marker's hashes are checked by whoever uses it) and the
  compiled kernels (~17 s; each file is named by a hash of its source, compiler and CPU).
  Where there are none, the session pulls or compiles its own copy in its own HOME, and
  the developer's cache stays untouched (`loraplex model pull` once spares CI the pull).

`hermetic_environment` (autouse) restores that state before each test: a test (or the code
it runs) that set a `LORAPLEX_*` variable or HOME outside `monkeypatch` cannot leak it into
the next. Tool settings that live under HOME are kept where they were: pip reads the
machine's user configuration (its wheel folders) through PIP_CONFIG_FILE.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Importing reads no setting (only a ServeSettings() call does, after the clean-up below).
from loraplex.base_model import COMPLETE_MARKER, EMBEDDED_MODEL_ID

_PREFIX = "LORAPLEX_"

_session: dict[str, Path] = {}


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def _seed_artifacts(developer_cache: Path, developer_model_cache: Path, cache: Path) -> None:
    """The pulled model and the compiled kernels of the developer's cache, in `cache`."""
    model = developer_model_cache / EMBEDDED_MODEL_ID
    if (model / COMPLETE_MARKER).is_file():
        for file in model.iterdir():
            if file.is_file():
                _link_or_copy(file, cache / "models" / EMBEDDED_MODEL_ID / file.name)
    for kernel in (developer_cache / "kernels").glob("*.so"):
        _link_or_copy(kernel, cache / "kernels" / kernel.name)


def pytest_configure(config: pytest.Config) -> None:
    real_home = Path.home()
    developer_cache = real_home / ".cache" / "loraplex"
    # The one value read from the developer's settings: where their pulled model is.
    developer_model_cache = Path(
        os.environ.get(f"{_PREFIX}MODEL_CACHE") or developer_cache / "models"
    ).expanduser()
    home = Path(tempfile.mkdtemp(prefix="loraplex-tests-home-"))
    _seed_artifacts(developer_cache, developer_model_cache, home / ".cache" / "loraplex")
    for name in [n for n in os.environ if n.startswith(_PREFIX)]:
        del os.environ[name]
    pip_config = real_home / ".config" / "pip" / "pip.conf"
    if pip_config.is_file() and "PIP_CONFIG_FILE" not in os.environ:
        os.environ["PIP_CONFIG_FILE"] = str(pip_config)
    os.environ["HOME"] = str(home)
    _session["home"] = home


def pytest_unconfigure(config: pytest.Config) -> None:
    home = _session.pop("home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The session's HOME, with no `LORAPLEX_*` variable set (see the module docstring)."""
    for name in [n for n in os.environ if n.startswith(_PREFIX)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(_session["home"]))
    yield _session["home"]
