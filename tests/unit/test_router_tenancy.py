"""Router wiring that needs no engine: readiness checks the database, /metrics without a
backend, and the bound on adapter label values (on SQLite and PostgreSQL)."""

from __future__ import annotations

import re
import socket
import uuid
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import create_engine

from loraplex.router.app import create_app
from loraplex.router.tenancy.guard import APIGuard
from loraplex.settings import ServeSettings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _app(tmp_path: Path, adapters: list[str], database_url: str, **settings: object) -> TestClient:
    for name in adapters:
        folder = tmp_path / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"")
    config = ServeSettings(
        adapters_dir=tmp_path / "adapters",
        base_model_name="base",
        database_url=database_url,
        **settings,  # type: ignore[arg-type]
    )
    return TestClient(create_app(config, f"http://127.0.0.1:{_closed_port()}"))


def test_ready_is_503_when_the_database_is_unreachable(tmp_path: Path, database_url: str) -> None:
    with _app(tmp_path, [], database_url) as client:
        guard = next(m for m in client.app.user_middleware if m.cls is APIGuard)
        store = guard.kwargs["authenticator"].store
        assert client.get("/ready").json()["error"]["code"] != "database_unavailable"
        unreachable = (
            f"sqlite:///{tmp_path}/missing-dir/loraplex.db"
            if database_url.startswith("sqlite")
            else f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/loraplex"
        )
        store.engine = create_engine(unreachable)
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"


def test_metrics_without_a_backend(tmp_path: Path) -> None:
    with _app(tmp_path, [], f"sqlite:///{tmp_path}/loraplex.db") as client:
        text = client.get("/metrics").text
        # One series per backend replica (the app's only one is a closed port).
        assert re.search(r'loraplex_backend_up\{backend="http://127\.0\.0\.1:\d+"\} 0\.0', text)
        response = client.get("/metrics/backend")
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable_error"


def test_adapter_labels_are_bounded_and_made_up_names_do_not_count(
    tmp_path: Path, database_url: str
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"  # the metric registry is global to the process
    names = [f"{tenant}/a", f"{tenant}/b", f"{tenant}/c"]
    with _app(tmp_path, names, database_url, metrics_max_label_values=3) as client:
        for model in [f"{tenant}/made-up", *names]:
            client.post("/v1/completions", json={"model": model, "prompt": "x"})
        text = client.get("/metrics").text
    # The base model holds one place; 404s never take one; a and b take the other two.
    assert f'adapter="{tenant}/made-up"' not in text  # in no metric at all
    assert (
        f'loraplex_requests_total{{adapter="{tenant}/a",status="503",tenant="anonymous"}} 1.0'
        in text
    )
    assert (
        f'loraplex_requests_total{{adapter="{tenant}/b",status="503",tenant="anonymous"}} 1.0'
        in text
    )
    assert f'loraplex_requests_total{{adapter="{tenant}/c"' not in text
    assert 'loraplex_requests_total{adapter="other",status="503",tenant="anonymous"}' in text
    assert 'loraplex_requests_total{adapter="unknown",status="404",tenant="anonymous"}' in text
