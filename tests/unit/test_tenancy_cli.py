"""`loraplex tenants|keys|quotas`: output a user reads, and errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.cli import main


@pytest.fixture
def db(tmp_path: Path) -> list[str]:
    return ["--database-url", f"sqlite:///{tmp_path}/loraplex.db"]


def test_create_list_revoke(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tenants", "create", "acme", *db]) == 0
    assert main(["keys", "create", "--tenant", "acme", "--expires", "30d", *db]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("lpx_") and "shown only now" in err and key not in err
    assert main(["keys", "list", "--json", *db]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["prefix"], k["tenant"], k["status"]) for k in listed] == [
        (key[:12], "acme", "active")
    ]
    assert key not in json.dumps(listed)
    assert main(["keys", "revoke", key[:12], *db]) == 0
    assert main(["keys", "list", *db]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["quotas", "set", "--tenant", "acme", "--requests-per-minute", "60", *db]) == 0
    assert main(["quotas", "list", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out)[0]["requests_per_minute"] == 60
    assert main(["tenants", "delete", "acme", *db]) == 0
    assert main(["tenants", "list", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out) == []


ERRORS = [
    (["tenants", "create", "public"], "error: tenant: 'public' is reserved"),
    (["tenants", "create", "a..b"], "error: tenant: tenant name contains '..'"),
    (["tenants", "delete", "nobody"], "error: tenant: no tenant named 'nobody'"),
    (["keys", "create"], "error: tenant: give either --tenant NAME or --admin"),
    (["keys", "create", "--tenant", "nobody"], "error: tenant: no tenant named 'nobody'"),
    (
        ["keys", "create", "--tenant", "acme", "--expires", "soon"],
        "error: expires: 'soon' is neither",
    ),
    (
        ["keys", "create", "--tenant", "acme", "--expires", "2001-01-01"],
        "error: expires: 2001-01-01 is in the past",
    ),
    (["keys", "revoke", "lpx_nothing"], "error: prefix: no key with prefix 'lpx_nothing'"),
    (["quotas", "set", "--tenant", "acme"], "error: requests_per_minute: give at least one limit"),
    (
        ["quotas", "set", "--tenant", "acme", "--adapter", "a/b/c", "--max-concurrent", "1"],
        "error: adapter: model name has more than one '/'",
    ),
    (["quotas", "delete", "--tenant", "acme"], "error: tenant: no quota for 'acme'"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS)
def test_errors_name_the_field_and_exit_2(
    db: list[str], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["tenants", "create", "acme", *db]) == 0
    capsys.readouterr()
    assert main([*args, *db]) == 2
    assert capsys.readouterr().err.startswith(message)


def test_bad_limit_is_an_argument_error(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["quotas", "set", "--tenant", "acme", "--max-concurrent", "0", *db])
    assert caught.value.code == 2
    assert "--max-concurrent: must be at least 1" in capsys.readouterr().err
