"""Admin HTTP endpoints for registry adapters, against a stand-in vLLM (no engine): an
alias change, a rollback and a delete through the API change what the next request serves."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.test_registry_router import Setup, make_setup

ADMIN = {"authorization": "Bearer admin-secret-123"}


@pytest.fixture
def setup(tmp_path) -> Iterator[Setup]:
    yield from make_setup(tmp_path, admin_key="admin-secret-123")


def test_admin_endpoints_need_an_admin_key(setup: Setup) -> None:
    response = setup.client.get("/admin/adapters")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    tenant_key = setup.client.post("/admin/keys", json={"tenant": "acme"}, headers=ADMIN)
    if tenant_key.status_code == 404:  # tenants must exist before their keys
        setup.client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)
        tenant_key = setup.client.post("/admin/keys", json={"tenant": "acme"}, headers=ADMIN)
    key = tenant_key.json()["key"]
    response = setup.client.get("/admin/adapters", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 403


def test_list_alias_rollback_and_delete_change_what_is_served(setup: Setup) -> None:
    setup.client.headers.update(ADMIN)
    v1 = setup.publish("acme/bot", seed=1)
    v2 = setup.publish("acme/bot", seed=2)

    listed = setup.client.get("/admin/adapters", params={"tenant": "acme"}).json()["data"]
    assert [a["name"] for a in listed] == ["acme/bot"]
    assert listed[0]["aliases"] == {"latest": 2}
    assert [v["sha256"] for v in listed[0]["versions"]] == [v1.digest, v2.digest]

    response = setup.client.put("/admin/adapters/acme/bot/aliases/stable", json={"version": "v1"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "adapter": "acme/bot",
        "alias": "stable",
        "version": "v1",
        "weights": {"v1": 100},
        "guard": None,
        "previous": None,
    }
    assert setup.served_digest("acme/bot@stable") == v1.digest
    assert setup.served_digest("acme/bot") == v2.digest

    response = setup.client.post("/admin/adapters/acme/bot/rollback")
    assert response.status_code == 200, response.text
    assert response.json()["version"] == "v1"
    assert setup.served_digest("acme/bot") == v1.digest

    # v1 carries @latest and @stable: refused unless forced.
    response = setup.client.delete("/admin/adapters/acme/bot/versions/v1")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    response = setup.client.delete("/admin/adapters/acme/bot/versions/v2")
    assert response.status_code == 200, response.text
    assert setup.ask("acme/bot:v2").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("put", "/admin/adapters/acme/bot/aliases/stable", {"version": "one"}, 400, "version"),
        ("put", "/admin/adapters/acme/bot/aliases/9lives", {"version": "v1"}, 400, "alias"),
        ("put", "/admin/adapters/acme/bot/aliases/stable", {"version": "v9"}, 404, "name"),
        ("put", "/admin/adapters/acme/bot/aliases/stable", {"versio": "v1"}, 400, "versio"),
        ("post", "/admin/adapters/acme/missing/rollback", None, 404, "name"),
        ("post", "/admin/adapters/acme/bot/rollback", None, 409, "name"),
        ("delete", "/admin/adapters/acme/bot/versions/v7", None, 404, "name"),
    ],
)
def test_bad_admin_requests_name_the_field(setup, method, path, body, status, param) -> None:
    setup.client.headers.update(ADMIN)
    setup.publish("acme/bot", seed=1)
    kwargs = {"json": body} if body is not None else {}
    response = getattr(setup.client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]
