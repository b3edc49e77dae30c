"""The router's secrets stay out of its vLLM engines, and the engines answer only the router.

An engine child gets an allowlisted environment (never the admin key or the database URL)
plus the plugin's settings and the engine key; vLLM's own key check (the middleware its
API server installs from VLLM_API_KEY) then refuses /v1/* without that key.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr
from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

from loraplex.router.backend_client import BackendClient
from loraplex.serving.vllm_backend import vllm_command, vllm_environment
from loraplex.settings import ServeSettings
from tests.unit.registry_helpers import bound_url, uvicorn_in_thread

SECRETS = {
    "LORAPLEX_ADMIN_KEY": "admin-secret-0123",
    "LORAPLEX_DATABASE_URL": "postgresql+psycopg://loraplex:db-password-4567@db/loraplex",
    "LORAPLEX_ADMIN_KEY_FILE": "/run/secrets/admin-key",
    "LORAPLEX_BACKEND_API_KEY": "engine-key-89ab",
    "GITHUB_TOKEN": "ghp_not-for-the-engine",
    "SOME_SERVICE_PASSWORD": "hunter2",
}
NEEDED = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/someone",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONPATH": "/opt/extra",
    "LD_LIBRARY_PATH": "/opt/lib",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "HF_HOME": "/hf",
    "TRANSFORMERS_CACHE": "/hf/t",
    "TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor",
    "CUDA_VISIBLE_DEVICES": "0",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "OMP_NUM_THREADS": "2",
    "AWS_ACCESS_KEY_ID": "AKIA-for-the-s3-registry",
    "AWS_SECRET_ACCESS_KEY": "the-registry-store-needs-it",
}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ServeSettings:
    for name, value in {**SECRETS, **NEEDED}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LORAPLEX_ADMIN_KEY_FILE")  # read by the settings: set below instead
    key_file = tmp_path / "admin-key"
    key_file.write_text(SECRETS["LORAPLEX_ADMIN_KEY"] + "\n")
    monkeypatch.delenv("LORAPLEX_ADMIN_KEY")
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY_FILE", str(key_file))
    return ServeSettings(
        adapters_dir=tmp_path / "adapters",
        registry_store="s3://bucket/registry",
        registry_s3_endpoint_url="http://minio:9000",
        registry_cache_dir=tmp_path / "cache",
        registry_cache_gib=3.5,
        cpu_lora_kernels="loraplex-torch",
    )


def test_the_engine_gets_no_secret_of_the_router(settings: ServeSettings) -> None:
    assert settings.admin_key.get_secret_value() == SECRETS["LORAPLEX_ADMIN_KEY"]
    env = vllm_environment(settings)
    text = json.dumps(env)
    for name, value in SECRETS.items():
        if name != "LORAPLEX_BACKEND_API_KEY":
            assert name not in env and value not in text, name
    assert {name: env.get(name) for name in NEEDED} == NEEDED
    # The engine key reaches vLLM through its environment, never its command line (`ps`).
    assert env["VLLM_API_KEY"] == SECRETS["LORAPLEX_BACKEND_API_KEY"]
    command = " ".join(vllm_command(settings))
    assert "--api-key" not in command and SECRETS["LORAPLEX_BACKEND_API_KEY"] not in command


def test_the_plugin_in_the_engine_reads_the_settings_it_needs(settings: ServeSettings) -> None:
    # ServeSettings as the plugin builds it inside vLLM, from the child's environment only.
    code = (
        "import json; from loraplex.settings import ServeSettings; s = ServeSettings(); "
        "print(json.dumps([str(s.adapters_dir), s.registry_store, s.registry_s3_endpoint_url,"
        " str(s.registry_cache_dir), s.registry_cache_gib, s.cpu_lora_kernels,"
        " s.admin_key.get_secret_value(), s.database_url]))"
    )
    env = vllm_environment(settings) | {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        str(settings.adapters_dir),
        "s3://bucket/registry",
        "http://minio:9000",
        str(settings.registry_cache_dir),
        3.5,
        "loraplex-torch",
        "",  # no admin key
        "",  # no database URL
    ]


def test_local_engines_get_a_random_key_per_serve_and_external_ones_only_a_set_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LORAPLEX_BACKEND_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    local = ServeSettings()
    one, two = local.with_local_engine_key(), local.with_local_engine_key()
    keys = {one.backend_api_key.get_secret_value(), two.backend_api_key.get_secret_value()}
    assert len(keys) == 2 and all(len(key) >= 32 for key in keys)
    assert vllm_environment(one)["VLLM_API_KEY"] == one.backend_api_key.get_secret_value()
    external = ServeSettings(backend_url="http://engine:8100").with_local_engine_key()
    assert external.backend_api_key.get_secret_value() == ""
    chosen = ServeSettings(backend_api_key=SecretStr("operator-key")).with_local_engine_key()
    assert chosen.backend_api_key.get_secret_value() == "operator-key"


@pytest.fixture
def vllm_guarded_server(settings: ServeSettings, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A server behind the key check vLLM's API server installs, configured from the
    environment loraplex gives the engine (VLLM_API_KEY)."""
    monkeypatch.setenv("VLLM_API_KEY", vllm_environment(settings)["VLLM_API_KEY"])
    app = FastAPI()
    app.get("/health")(lambda: {})
    app.post("/v1/completions")(lambda: {"choices": []})
    args = Namespace(
        allowed_origins=["*"],
        allow_credentials=False,
        allowed_methods=["*"],
        allowed_headers=["*"],
        api_key=None,
        enable_request_id_headers=False,
        middleware=[],
    )
    init_entrypoints_middleware(args, app, supported_tasks=())
    config = uvicorn.Config(app, port=0, log_level="warning")
    with uvicorn_in_thread(config) as server:
        assert server.started, "guarded vLLM server did not start"
        yield bound_url(server)


def test_the_router_client_sends_the_engine_key_and_others_get_401(
    settings: ServeSettings, vllm_guarded_server: str
) -> None:
    url = vllm_guarded_server
    key = settings.backend_api_key.get_secret_value()

    async def send(api_key: str) -> tuple[int, bool]:
        client = BackendClient(url, timeout_s=10, api_key=api_key)
        try:
            response = await client.send("/v1/completions", b"{}", stream=False)
            return response.status_code, await client.is_healthy()
        finally:
            await client.close()

    assert asyncio.run(send(key)) == (200, True)
    assert asyncio.run(send("")) == (401, True)  # /health stays open, as in vLLM
    assert asyncio.run(send("a-wrong-key")) == (401, True)
    assert httpx.post(f"{url}/v1/completions", json={}).status_code == 401
