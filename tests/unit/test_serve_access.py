"""The safe default of `loraplex serve`: no keys configured → loopback only, unless allowed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.unit.registry_helpers import free_port
from tests.unit.serve_process import clean_env, serve_command, wait_answering


def _serve(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = serve_command(
        port,
        # A backend that is never reached: these checks happen before any model work.
        "--backend-url",
        "http://127.0.0.1:9",
        "--base-model",
        str(tmp_path),
        "--database-url",
        f"sqlite:///{tmp_path}/loraplex.db",
        "--adapters-dir",
        str(tmp_path),
        *flags,
    )
    process = subprocess.Popen(command, env=clean_env(), stderr=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{port}"


def _wait_health(process: subprocess.Popen, url: str) -> None:
    # stderr is a pipe: readable (to its end) only once the router has exited.
    def stderr() -> str:
        if process.poll() is None or process.stderr is None:
            return ""
        return process.stderr.read()

    wait_answering(process, url, "/health", 60, stderr)


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    return stderr


def test_refuses_open_access_on_a_public_address(tmp_path: Path) -> None:
    process, _ = _serve(tmp_path, "--host", "0.0.0.0")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "refusing to serve without API keys on 0.0.0.0" in stderr
    assert "LORAPLEX_ALLOW_OPEN_ACCESS" in stderr


def test_public_address_serves_with_explicit_open_access(tmp_path: Path) -> None:
    # A switch, like every boolean setting (it took a value before issue 11).
    process, url = _serve(tmp_path, "--host", "0.0.0.0", "--allow-open-access")
    try:
        _wait_health(process, url)
        assert httpx.get(f"{url}/v1/models").status_code == 200
    finally:
        stderr = _stop(process)
    assert "serving WITHOUT API keys on a non-loopback address" in stderr


def test_loopback_serves_without_keys_and_says_so(tmp_path: Path) -> None:
    process, url = _serve(tmp_path)
    try:
        _wait_health(process, url)
        assert httpx.get(f"{url}/v1/models").status_code == 200
    finally:
        stderr = _stop(process)
    assert "serving WITHOUT API keys on loopback" in stderr


def test_public_address_with_a_tenant_requires_keys(tmp_path: Path) -> None:
    database = ["--database-url", f"sqlite:///{tmp_path}/loraplex.db"]
    subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "tenants", "create", "acme", *database], check=True
    )
    process, url = _serve(tmp_path, "--host", "0.0.0.0")
    try:
        _wait_health(process, url)
        response = httpx.get(f"{url}/v1/models")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    finally:
        _stop(process)
