"""Inputs an attacker or a careless client sends (issue 12, items 1, 3, 9 and 11): each is
an OpenAI-shaped 4xx naming the field, never a 5xx, never a stream the quota did not see."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient

from loraplex.router.app import create_app
from loraplex.router.body_limit import BodyLimitMiddleware
from loraplex.settings import ServeSettings
from tests.unit.stub_replica import StubReplica, stub_replicas

ADMIN = {"Authorization": "Bearer admin-secret"}


@dataclass
class Router:
    client: TestClient
    replica: StubReplica
    tenant_key: dict[str, str]


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    settings = ServeSettings(
        adapters_dir=tmp_path / "adapters",
        base_model_name="base",
        database_url=f"sqlite:///{tmp_path}/loraplex.db",
        registry_store=str(tmp_path / "store"),
        registry_cache_dir=tmp_path / "cache",
        health_check_interval_s=3600.0,
        admin_key="admin-secret",
        max_request_body_mib=1,
    )
    with (
        stub_replicas("a") as (replica,),
        TestClient(create_app(settings, [replica.url])) as client,
    ):
        assert client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN).is_success
        key = client.post("/admin/keys", json={"tenant": "acme"}, headers=ADMIN).json()["key"]
        yield Router(client, replica, {"Authorization": f"Bearer {key}"})


def _nested(depth: int) -> bytes:
    return b'{"model": "base", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


def _body(fields: dict) -> bytes:
    return json.dumps({"model": "base", "prompt": "hi", **fields}).encode()


# (name, raw body, status, code, param); all on /v1/completions with the admin key.
COMPLETION_CASES = [
    ("stream 1", _body({"stream": 1}), 400, None, "stream"),
    ("stream 'true'", _body({"stream": "true"}), 400, None, "stream"),
    ("n '2'", _body({"n": "2"}), 400, None, "n"),
    ("n true", _body({"n": True}), 400, None, "n"),
    ("n 0", _body({"n": 0}), 400, None, "n"),
    ("max_tokens '16'", _body({"max_tokens": "16"}), 400, None, "max_tokens"),
    (
        "max_completion_tokens 1.5",
        _body({"max_completion_tokens": 1.5}),
        400,
        None,
        "max_completion_tokens",
    ),
    (
        "stream_options 'yes'",
        _body({"stream": True, "stream_options": "yes"}),
        400,
        None,
        "stream_options",
    ),
    ("stream_options list", _body({"stream_options": [1]}), 400, None, "stream_options"),
    (
        "include_usage 'yes'",
        _body({"stream": True, "stream_options": {"include_usage": "yes"}}),
        400,
        None,
        "stream_options.include_usage",
    ),
    ("model 257 chars", _body({"model": "m" * 257}), 400, None, "model"),
    ("model 5 MB", _body({"model": "m" * (5 << 20)}), 413, "request_too_large", None),
    ("model a number", _body({"model": 5}), 400, None, "model"),
    ("nested 100,000 deep", _nested(100_000), 400, None, None),
    ("nested 65 deep", _nested(64), 400, None, None),
    ("not JSON", b"{", 400, None, None),
    ("an array", b"[]", 400, None, None),
    ("body over the limit", _body({"prompt": "x" * (1 << 20)}), 413, "request_too_large", None),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [case[1:] for case in COMPLETION_CASES],
    ids=[case[0] for case in COMPLETION_CASES],
)
def test_bad_completion_bodies_are_4xx_naming_the_field(
    router: Router, body: bytes, status: int, code: str | None, param: str | None
) -> None:
    response = router.client.post(
        "/v1/completions", content=body, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)
    assert router.replica.requests == []  # nothing reached the engine


def test_nesting_at_the_limit_is_accepted(router: Router) -> None:
    # 63 brackets inside the top-level object: 64 levels in all. In a field the router
    # passes through untyped (a nested `prompt` is not one of OpenAI's prompt types).
    body = b'{"model": "base", "prompt": "hi", "extra": ' + b"[" * 63 + b"]" * 63 + b"}"
    response = router.client.post("/v1/completions", content=body, headers=ADMIN)
    assert response.status_code == 200, response.text


# (name, method, path, body, status, code, param); with the admin key, after `acme` exists.
ADMIN_CASES = [
    (
        "rpm true",
        "PUT",
        "/admin/quotas",
        {"tenant": "acme", "requests_per_minute": True},
        400,
        None,
        "requests_per_minute",
    ),
    (
        "rpm '10'",
        "PUT",
        "/admin/quotas",
        {"tenant": "acme", "requests_per_minute": "10"},
        400,
        None,
        "requests_per_minute",
    ),
    (
        "tpm 10**30",
        "PUT",
        "/admin/quotas",
        {"tenant": "acme", "tokens_per_minute": 10**30},
        400,
        None,
        "tokens_per_minute",
    ),
    (
        "concurrency 1e400",
        "PUT",
        "/admin/quotas",
        b'{"tenant": "acme", "max_concurrent": 1e400}',
        400,
        None,
        "max_concurrent",
    ),
    (
        "expires Arabic-Indic 3d",
        "POST",
        "/admin/keys",
        {"tenant": "acme", "expires": "٣d"},
        400,
        None,
        "expires",
    ),
    (
        "expires 10**22 days",
        "POST",
        "/admin/keys",
        {"tenant": "acme", "expires": "1" * 22 + "d"},
        400,
        None,
        "expires",
    ),
    ("admin 'true'", "POST", "/admin/keys", {"admin": "true"}, 400, None, "admin"),
    (
        "ACME after acme",
        "POST",
        "/admin/tenants",
        {"name": "ACME"},
        409,
        "already_exists",
        "tenant",
    ),
    ("tenant a number", "POST", "/admin/tenants", {"name": 7}, 400, None, "name"),
    (
        "admin body over the limit",
        "POST",
        "/admin/tenants",
        {"name": "x" * (1 << 20)},
        413,
        "request_too_large",
        None,
    ),
    (
        "nested 100,000 deep",
        "POST",
        "/admin/tenants",
        b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "param"),
    [case[1:] for case in ADMIN_CASES],
    ids=[case[0] for case in ADMIN_CASES],
)
def test_bad_admin_bodies_are_4xx_naming_the_field(
    router: Router,
    method: str,
    path: str,
    body: dict | bytes,
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = router.client.request(method, path, content=content, headers=ADMIN)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)
    quota = router.client.get("/admin/quotas", headers=ADMIN).json()["data"]
    assert quota == []  # nothing stored


def test_a_quota_tenant_gets_no_uncharged_stream(router: Router) -> None:
    put = {"tenant": "acme", "tokens_per_minute": 10}
    assert router.client.put("/admin/quotas", json=put, headers=ADMIN).is_success
    for stream in (1, "true"):
        response = router.client.post(
            "/v1/completions",
            json={"model": "base", "prompt": "hi", "stream": stream},
            headers=router.tenant_key,
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "stream"
    assert router.replica.requests == []
    # A real stream is charged (the stub's usage: 7 tokens), so the next one waits.
    body = {"model": "base", "prompt": "hi", "stream": True}
    first = router.client.post("/v1/completions", json=body, headers=router.tenant_key)
    assert first.status_code == 200
    assert "usage" not in first.text  # the usage chunk the router asked for is dropped
    second = router.client.post("/v1/completions", json=body, headers=router.tenant_key)
    assert second.status_code == 200  # 3 of 10 tokens left: admitted, then charged
    third = router.client.post("/v1/completions", json=body, headers=router.tenant_key)
    assert third.status_code == 429
    assert len(router.replica.requests) == 2


def test_a_request_whose_worst_case_exceeds_the_budget_is_refused_up_front(
    router: Router,
) -> None:
    put = {"tenant": "acme", "tokens_per_minute": 10}
    assert router.client.put("/admin/quotas", json=put, headers=ADMIN).is_success

    def complete(**fields: object):  # type: ignore[no-untyped-def]
        body = {"model": "base", "prompt": "hi", **fields}
        return router.client.post("/v1/completions", json=body, headers=router.tenant_key)

    never = complete(n=16, max_tokens=256)  # 4,096 tokens under a 10 tokens/min limit
    assert never.status_code == 429
    assert never.json()["error"]["code"] == "rate_limit_exceeded"
    assert never.json()["error"]["type"] == "rate_limit_error"
    assert int(never.headers["Retry-After"]) >= 1
    assert complete(max_completion_tokens=11).status_code == 429
    assert router.replica.requests == []
    assert complete(n=2, max_tokens=5).status_code == 200  # 10 fit; the stub uses 7
    later = complete(max_tokens=4)  # 3 left
    assert later.status_code == 429
    assert 1 <= int(later.headers["Retry-After"]) <= 60
    assert complete(max_tokens=3).status_code == 200
    assert len(router.replica.requests) == 2


def test_a_long_model_name_is_never_logged_whole(
    router: Router, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="loraplex.router.access"):
        router.client.post(
            "/v1/completions", content=_body({"model": "m" * 100_000}), headers=ADMIN
        )
    assert caplog.records
    assert all(len(record.getMessage()) < 1000 for record in caplog.records)
    assert all(len(str(getattr(r, "model", None))) <= 260 for r in caplog.records)


def test_a_chunked_body_is_cut_off_at_the_limit() -> None:
    """No Content-Length: the body is counted while read, and reading stops past the limit."""
    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True}] * 10
    read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        read += 1
        return chunks[read - 1]

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope: dict, receive_: object, send_: object) -> None:
        while (await receive_())["more_body"]:  # type: ignore[operator]
            pass

    middleware = BodyLimitMiddleware(app, limit_bytes=1000)
    anyio.run(middleware, {"type": "http", "headers": []}, receive, send)
    assert read == 3  # 1,200 bytes > 1,000: no fourth chunk read
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("path", ["/v1/completions", "/admin/tenants"])
def test_a_body_without_content_length_is_counted(router: Router, path: str) -> None:
    chunks = iter([b"x" * 600_000] * 3)  # no Content-Length: sent chunked
    response = router.client.post(path, content=chunks, headers=ADMIN)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
