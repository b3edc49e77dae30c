"""The router's OpenAPI contract (issue 12, item 12): request bodies and every error status
documented in OpenAI's error schema, 405 with `Allow`, parameter type errors as a 400
naming the field, and the contract and its pages behind the admin key once keys exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraplex.router.app import create_app
from loraplex.settings import ServeSettings
from tests.unit.stub_replica import stub_replicas

ADMIN = {"Authorization": "Bearer admin-secret"}
DOC_PATHS = ("/openapi.json", "/docs", "/redoc")


def _settings(tmp_path: Path, **fields: object) -> ServeSettings:
    return ServeSettings(
        adapters_dir=tmp_path / "adapters",
        base_model_name="base",
        database_url=f"sqlite:///{tmp_path}/loraplex.db",
        registry_store=str(tmp_path / "store"),
        registry_cache_dir=tmp_path / "cache",
        health_check_interval_s=3600.0,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with (
        stub_replicas("a") as (replica,),
        TestClient(create_app(_settings(tmp_path, admin_key="admin-secret"), [replica.url])) as c,
    ):
        yield c


def test_docs_need_the_admin_key_once_keys_are_required(client: TestClient) -> None:
    assert client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN).is_success
    key = client.post("/admin/keys", json={"tenant": "acme"}, headers=ADMIN).json()["key"]
    for path in DOC_PATHS:
        anonymous = client.get(path)
        assert anonymous.status_code == 401, path
        assert anonymous.json()["error"]["type"] == "authentication_error"
        assert client.get(path, headers={"Authorization": f"Bearer {key}"}).status_code == 403
        assert client.get(path, headers=ADMIN).status_code == 200, path


def test_docs_are_open_in_open_loopback_mode(tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path), "http://127.0.0.1:9")) as c:
        for path in DOC_PATHS:
            assert c.get(path).status_code == 200, path


def test_completion_bodies_and_every_error_status_are_documented(client: TestClient) -> None:
    schema = client.get("/openapi.json", headers=ADMIN).json()
    components = schema["components"]["schemas"]
    for path, model in [
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
    ]:
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        fields = components[model]["properties"]
        # OpenAI's sampling fields and vLLM's own, typed; anything else passes through.
        assert {"model", "stream", "n", "max_tokens", "temperature", "stop", "seed"} <= set(fields)
        assert {"top_k", "min_p", "repetition_penalty"} <= set(fields)
        assert components[model]["additionalProperties"] is True
        assert {"application/json", "text/event-stream"} <= set(
            operation["responses"]["200"]["content"]
        )
        assert {"400", "401", "404", "413", "429", "500", "502", "503", "504"} <= set(
            operation["responses"]
        )
    assert "messages" in components["ChatCompletionRequest"]["required"]
    assert "prompt" in components["CompletionRequest"]["required"]
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            errors = {s: r for s, r in operation["responses"].items() if int(s) >= 400}
            assert "413" in errors and "422" not in errors, (method, path)
            for status, response in errors.items():
                assert response["content"]["application/json"]["schema"] == error_ref, status
    assert set(components["ErrorResponse"]["properties"]) == {"error"}
    assert set(components["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/completions", "POST"),
        ("PUT", "/health", "GET"),
        ("POST", "/v1/models", "GET"),
        ("PATCH", "/admin/tenants", "GET, POST"),
    ],
)
def test_405_names_the_allowed_methods(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    response = client.request(method, path, headers=ADMIN)
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == set(allow.split(", "))
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_parameter_of_the_wrong_type_is_a_400_naming_it(client: TestClient) -> None:
    response = client.delete("/admin/adapters/acme/bot/versions/v1?force=maybe", headers=ADMIN)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "force"
    assert error["message"].startswith("Invalid field 'force': Input should be a valid boolean")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "0.5"}, "temperature"),
        ({"stop": 5}, "stop"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": 5, "content": "hi"}]}, "messages.0.role"),
        ({"max_tokens": 16.5}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),
    ],
)
def test_a_body_field_of_the_wrong_type_is_a_400_naming_it(
    client: TestClient, fields: dict, param: str
) -> None:
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], **fields}
    response = client.post("/v1/chat/completions", json=body, headers=ADMIN)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(f"Invalid field '{param}': ")
    assert "{" not in error["message"]  # words, not a dump of pydantic's error dict


def test_unknown_fields_pass_through_to_the_engine(client: TestClient) -> None:
    # 16.0 is an integer in JSON (and to vLLM); an integer is a valid float.
    body = {"model": "base", "prompt": "hi", "temperature": 1, "max_tokens": 16.0}
    body["guided_choice"] = ["a", "b"]
    response = client.post("/v1/completions", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
