"""`loraplex quotas set` and `PUT /admin/quotas` change only the limits they name.

A limit left out keeps its value (a tenant's requests-per-minute must not vanish when
its tokens-per-minute is set); `--clear LIMIT` or a JSON null removes one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from loraplex.cli import main
from loraplex.database import create_db_engine, migrate
from loraplex.router.errors import APIError, error_response
from loraplex.router.tenancy.admin_api import admin_router
from loraplex.router.tenancy.auth import Principal
from loraplex.router.tenancy.store import TenancyStore


@pytest.fixture
def db(tmp_path: Path) -> list[str]:
    return ["--database-url", f"sqlite:///{tmp_path}/loraplex.db"]


def quotas(db: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    capsys.readouterr()
    assert main(["quotas", "list", "--json", *db]) == 0
    return json.loads(capsys.readouterr().out)


def limits(row: dict) -> tuple[int | None, int | None, int | None]:
    return row["requests_per_minute"], row["tokens_per_minute"], row["max_concurrent"]


def test_cli_sets_only_what_is_passed(db: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tenants", "create", "acme", *db]) == 0
    assert main(["quotas", "set", "--tenant", "acme", "--requests-per-minute", "60", *db]) == 0
    assert main(["quotas", "set", "--tenant", "acme", "--tokens-per-minute", "5000", *db]) == 0
    [row] = quotas(db, capsys)
    assert limits(row) == (60, 5000, None)  # requests-per-minute kept

    assert main(["quotas", "set", "--tenant", "acme", "--clear", "tokens-per-minute", *db]) == 0
    [row] = quotas(db, capsys)
    assert limits(row) == (60, None, None)

    args = ["--max-concurrent", "2", "--clear", "requests-per-minute"]
    assert main(["quotas", "set", "--tenant", "acme", *args, *db]) == 0
    [row] = quotas(db, capsys)
    assert limits(row) == (None, None, 2)


def test_cli_per_adapter_quota_leaves_the_tenant_quota_alone(
    db: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tenants", "create", "acme", *db]) == 0
    assert main(["quotas", "set", "--tenant", "acme", "--requests-per-minute", "60", *db]) == 0
    adapter = ["--adapter", "acme/chat"]
    assert main(["quotas", "set", "--tenant", "acme", *adapter, "--max-concurrent", "1", *db]) == 0
    rows = {row["adapter"]: limits(row) for row in quotas(db, capsys)}
    assert rows == {"(all)": (60, None, None), "acme/chat": (None, None, 1)}


CLI_REFUSALS = [
    (
        ["--tokens-per-minute", "5", "--clear", "tokens-per-minute"],
        "error: tokens_per_minute: both --tokens-per-minute and --clear tokens-per-minute given",
    ),
    # Clearing the last limit would leave an empty quota: `quotas delete` removes it.
    (["--clear", "requests-per-minute"], "error: requests_per_minute: give at least one limit"),
]


@pytest.mark.parametrize(("args", "message"), CLI_REFUSALS)
def test_cli_refusals_change_nothing(
    db: list[str], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["tenants", "create", "acme", *db]) == 0
    assert main(["quotas", "set", "--tenant", "acme", "--requests-per-minute", "60", *db]) == 0
    capsys.readouterr()
    assert main(["quotas", "set", "--tenant", "acme", *args, *db]) == 2
    assert capsys.readouterr().err.startswith(message)
    [row] = quotas(db, capsys)
    assert limits(row) == (60, None, None)


def test_cli_clear_takes_only_limit_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["quotas", "set", "--tenant", "acme", "--clear", "everything"])
    assert caught.value.code == 2
    assert "--clear: invalid choice: 'everything'" in capsys.readouterr().err


@pytest.fixture
def admin(tmp_path: Path) -> TestClient:
    """The admin router over a real migrated store, called with an admin principal."""
    engine = create_db_engine(f"sqlite:///{tmp_path}/loraplex.db")
    migrate(engine)
    store = TenancyStore(engine)
    store.create_tenant("acme")
    app = FastAPI()

    @app.middleware("http")
    async def as_admin(request: Request, call_next):  # type: ignore[no-untyped-def]
        request.state.principal = Principal(role="admin")
        return await call_next(request)

    app.exception_handler(APIError)(lambda _request, exc: error_response(exc))
    app.include_router(admin_router(store))
    return TestClient(app)


def test_api_absent_field_is_kept_and_null_clears(admin: TestClient) -> None:
    put = admin.put("/admin/quotas", json={"tenant": "acme", "requests_per_minute": 60})
    assert put.status_code == 200
    put = admin.put("/admin/quotas", json={"tenant": "acme", "tokens_per_minute": 5000})
    assert put.status_code == 200 and limits(put.json()) == (60, 5000, None)
    put = admin.put("/admin/quotas", json={"tenant": "acme", "requests_per_minute": None})
    assert put.status_code == 200 and limits(put.json()) == (None, 5000, None)
    [row] = admin.get("/admin/quotas").json()["data"]
    assert limits(row) == (None, 5000, None)


def test_api_refuses_a_body_that_changes_nothing_or_clears_everything(admin: TestClient) -> None:
    empty = admin.put("/admin/quotas", json={"tenant": "acme"})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "requests_per_minute"
    admin.put("/admin/quotas", json={"tenant": "acme", "max_concurrent": 3})
    cleared = admin.put("/admin/quotas", json={"tenant": "acme", "max_concurrent": None})
    assert cleared.status_code == 400 and cleared.json()["error"]["param"] == "max_concurrent"
    [row] = admin.get("/admin/quotas").json()["data"]
    assert limits(row) == (None, None, 3)
