"""Two router processes (`loraplex serve`) on one PostgreSQL database, as two replicas of the
router behind a load balancer: a concurrency limit holds across both, a key revoked
through one is refused by the other on the next request, and an adapter version
published (or rolled back through one router) is what the other one serves.

The backend is a small stand-in vLLM on loopback that records which model name each
completion asked for, and can hold completions until the test lets them go.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from tests.postgres_server import PostgresServer, PostgresUnavailable
from tests.unit.registry_helpers import (
    bound_url,
    free_port,
    make_adapter_dir,
    make_base_dir,
    uvicorn_in_thread,
)
from tests.unit.serve_process import clean_env, serve_command, wait_answering

pytestmark = pytest.mark.postgres

ADMIN_KEY = f"admin-{uuid.uuid4().hex}"
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


class HoldingBackend:
    """Speaks the part of vLLM's API the router uses; completions wait while `hold` is set."""

    def __init__(self) -> None:
        self.models: list[str] = []
        """`model` of every completion, in arrival order."""
        self.hold = False
        self.held = 0
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {}

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse("")

        @app.post("/v1/load_lora_adapter")
        @app.post("/v1/unload_lora_adapter")
        async def lora_admin() -> str:
            return "Success"

        @app.post("/v1/completions")
        async def complete(request: Request) -> dict:
            model = (await request.json())["model"]
            self.models.append(model)
            self.held += 1
            try:
                while self.hold:
                    await asyncio.sleep(0.01)
            finally:
                self.held -= 1
            return {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": model,
                "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
                "usage": USAGE,
            }

        self.app = app

    def serve(self) -> Iterator[str]:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error")
        with uvicorn_in_thread(config) as server:
            assert server.started, "stand-in backend did not start"
            try:
                yield bound_url(server)
            finally:
                self.hold = False  # lets held completions finish before the server stops


def _wait(condition: Callable[[], bool], timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


@dataclass
class Cluster:
    routers: list[str]
    backend: HoldingBackend
    database_url: str
    tmp: Path
    base_dir: Path

    def admin(self, router: int, method: str, path: str, **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        return httpx.request(
            method, self.routers[router] + path, headers=headers, timeout=30, **kwargs
        )

    def tenant_with_key(self, router: int, tenant: str) -> tuple[str, str]:
        """Create `tenant` and a key for it through one router: (raw key, key prefix)."""
        assert self.admin(router, "POST", "/admin/tenants", json={"name": tenant}).is_success
        response = self.admin(router, "POST", "/admin/keys", json={"tenant": tenant})
        assert response.status_code == 201, response.text
        return response.json()["key"], response.json()["prefix"]

    def complete(self, router: int, key: str, model: str = "base") -> httpx.Response:
        return httpx.post(
            self.routers[router] + "/v1/completions",
            json={"model": model, "prompt": "hi", "max_tokens": 4},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )

    def publish(self, folder: Path, name: str) -> str:
        """`loraplex adapters publish` against the shared database; the new version id."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "loraplex.cli",
                "adapters",
                "publish",
                str(folder),
                "--name",
                name,
                "--force",  # generated weights: no held-out scores for the quality gate
                "--database-url",
                self.database_url,
                "--registry-store",
                str(self.tmp / "store"),
                "--registry-cache-dir",
                str(self.tmp / "publish-cache"),
                "--base-model",
                str(self.base_dir),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=clean_env(),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        match = re.search(r"published \S+ \(@latest\) (\S+)", result.stdout)
        assert match, result.stdout
        return match.group(1)


def _start_router(
    tmp: Path, number: int, backend_url: str, database_url: str, base_dir: Path
) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp / f"router{number}.log"
    command = serve_command(
        port,
        "--backend-url",
        backend_url,
        "--base-model",
        str(base_dir),
        "--base-model-name",
        "base",
        "--database-url",
        database_url,
        "--adapters-dir",
        str(tmp / "adapters"),
        "--registry-store",
        str(tmp / "store"),
        "--registry-cache-dir",
        str(tmp / f"cache{number}"),
    )
    env = {**clean_env(), "LORAPLEX_ADMIN_KEY": ADMIN_KEY}
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log


@pytest.fixture(scope="module")
def cluster(
    postgres_server: PostgresServer | PostgresUnavailable, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if isinstance(postgres_server, PostgresUnavailable):
        pytest.fail(str(postgres_server), pytrace=False)
    tmp = tmp_path_factory.mktemp("two-routers")
    base_dir = make_base_dir(tmp / "base")
    (tmp / "adapters").mkdir()
    database = postgres_server.create_database()
    # The scheme users write; loraplex picks the psycopg driver it ships.
    database_url = postgres_server.url(database).replace("postgresql+psycopg://", "postgresql://")
    backend = HoldingBackend()
    serving = backend.serve()
    backend_url = next(serving)
    # Both start at once on an empty database: one migrates, the other waits for it.
    routers = [_start_router(tmp, n, backend_url, database_url, base_dir) for n in (0, 1)]
    try:
        for process, url, log in routers:
            wait_answering(process, url, "/ready", 90, log.read_text)
        yield Cluster([url for _, url, _ in routers], backend, database_url, tmp, base_dir)
    finally:
        for process, _, _ in routers:
            process.send_signal(signal.SIGTERM)
        for process, _, _ in routers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        next(serving, None)
        postgres_server.drop_database(database)


def test_a_concurrency_limit_holds_across_both_routers(cluster: Cluster) -> None:
    key, _ = cluster.tenant_with_key(0, "conc")
    quota = {"tenant": "conc", "max_concurrent": 3}
    assert cluster.admin(1, "PUT", "/admin/quotas", json=quota).status_code == 200
    cluster.backend.hold = True
    with ThreadPoolExecutor(8) as pool:
        # 8 requests at once, 4 through each router, for 3 slots.
        futures = [pool.submit(cluster.complete, n % 2, key) for n in range(8)]
        try:
            _wait(
                lambda: sum(f.done() for f in futures) == 5 and cluster.backend.held == 3,
                60,
                "expected 3 requests held by the backend and 5 answered",
            )
        finally:
            cluster.backend.hold = False
        responses = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 3 + [429] * 5, [r.text for r in responses]
    for refused in (r for r in responses if r.status_code == 429):
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "Concurrency limit reached: 3" in refused.json()["error"]["message"]
    # The slots are given back by whichever router held them: 3 at once again, on both.
    with ThreadPoolExecutor(3) as pool:
        again = list(pool.map(lambda n: cluster.complete(n % 2, key), range(3)))
    assert [r.status_code for r in again] == [200, 200, 200]


def test_a_key_revoked_through_one_router_is_refused_by_the_other(cluster: Cluster) -> None:
    key, prefix = cluster.tenant_with_key(0, "rev")
    assert cluster.complete(1, key).status_code == 200
    assert cluster.admin(0, "DELETE", f"/admin/keys/{prefix}").status_code == 200
    refused = cluster.complete(1, key)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "Invalid API key."


def test_a_version_published_or_rolled_back_through_one_is_served_by_the_other(
    cluster: Cluster,
) -> None:
    key, _ = cluster.tenant_with_key(0, "pub")

    def served_by(router: int) -> str:
        """The version id router `router` sent the backend for `pub/bot`."""
        response = cluster.complete(router, key, "pub/bot")
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "pub/bot"  # the client sees its own name
        return cluster.backend.models[-1]

    assert cluster.complete(1, key, "pub/bot").status_code == 404  # not published yet
    v1 = cluster.publish(make_adapter_dir(cluster.tmp / "src" / "v1", seed=1), "pub/bot")
    assert served_by(1) == v1 and served_by(0) == v1
    v2 = cluster.publish(make_adapter_dir(cluster.tmp / "src" / "v2", seed=2), "pub/bot")
    assert v2 != v1
    assert served_by(1) == v2
    # An alias move through router 0's admin API is what router 1 serves next.
    assert cluster.admin(0, "POST", "/admin/adapters/pub/bot/rollback").status_code == 200
    assert served_by(1) == v1
    assert served_by(0) == v1
