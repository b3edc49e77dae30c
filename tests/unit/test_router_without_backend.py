"""Router behaviour that needs no engine: validation, resolution and a dead backend."""

from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient

from loraplex.router.app import create_app
from loraplex.settings import ServeSettings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def client(tmp_path) -> TestClient:
    adapter = tmp_path / "demo" / "alpha"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    settings = ServeSettings(
        adapters_dir=tmp_path, base_model_name="base", database_url=f"sqlite:///{tmp_path}/db"
    )
    app = create_app(settings, f"http://127.0.0.1:{_closed_port()}")
    with TestClient(app) as test_client:
        yield test_client


def test_backend_down_is_503_for_base_and_adapter(client: TestClient) -> None:
    for model in ("base", "demo/alpha"):
        response = client.post("/v1/chat/completions", json={"model": model, "messages": [{}]})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable_error"


def test_ready_reports_backend_down_but_health_is_alive(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "backend_unavailable"


def test_models_lists_base_and_adapter_with_parent(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("base", None), ("demo/alpha", "base")]


def test_unknown_model_is_404_before_any_backend_call(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "demo/beta", "prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    assert client.get("/health").headers["x-request-id"]
    assert client.get("/health", headers={"x-request-id": "r-1"}).headers["x-request-id"] == "r-1"
