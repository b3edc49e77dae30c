"""A `--database-url` that names no usable database (issue 12, item 10): the CLI says which
setting and URL are at fault and exits 3 (README: store or database unreachable), with no
traceback, and never creates the folder a SQLite URL names."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.cli import main
from loraplex.database import DatabaseURLError, create_db_engine

# (name, URL with {tmp} for the test's folder, words the message must have)
BAD_URLS = [
    ("postgresql without its driver", "postgresql+psycopg2://bob:pw@127.0.0.1/x", "psycopg2"),
    ("mysql without its driver", "mysql://bob@db.example/x", "MySQLdb"),
    ("not a URL", "nonsense", "not a database URL"),
    ("no such dialect", "foo://x", "no SQLAlchemy dialect 'foo'"),
    ("sqlite under a file", "sqlite:///{tmp}/a-file/loraplex.db", "is a file, not a folder"),
    ("sqlite in a missing folder", "sqlite:///{tmp}/missing/loraplex.db", "does not exist"),
]


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path


@pytest.mark.parametrize("command", [["adapters", "list"], ["tenants", "list"]])
@pytest.mark.parametrize(
    ("url", "words"), [case[1:] for case in BAD_URLS], ids=[case[0] for case in BAD_URLS]
)
def test_bad_database_url_exits_3_naming_it(
    tmp: Path, capsys: pytest.CaptureFixture[str], command: list[str], url: str, words: str
) -> None:
    url = url.format(tmp=tmp)
    code = main([*command, "--database-url", url])
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.startswith("error: database_url '") and words in err, err
    assert "Traceback" not in err
    assert "pw@" not in err  # the password is hidden
    assert not (tmp / "missing").exists()  # no folder made for a typo


def test_the_default_cache_folder_is_still_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """loraplex's own default location (the cache) is made on first use, as before."""
    monkeypatch.setenv("HOME", str(tmp_path))
    default = tmp_path / ".cache" / "loraplex"
    engine = create_db_engine(f"sqlite:///{default}/loraplex.db")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()
    assert default.is_dir()
    with pytest.raises(DatabaseURLError, match="does not exist"):
        create_db_engine(f"sqlite:///{tmp_path}/elsewhere/loraplex.db")
