"""Billing and prefix-cache isolation through the real router app, over real HTTP, in front
of a stub backend that records what it was sent and notices when its client hangs up.

- Every request of a tenant reaches the engine with the tenant's own `cache_salt`.
- A client that leaves closes the backend request (vLLM aborts such a request) and is
  still charged: a cut stream for what it received, a non-streamed request its worst case.
The same on the real engine: tests/integration/test_billing_vllm.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.database import shared_engine
from loraplex.router.app import create_app
from loraplex.router.tenancy.auth import ANONYMOUS, Principal
from loraplex.router.tenancy.cache_salt import CacheSalts
from loraplex.router.tenancy.store import TenancyStore
from loraplex.settings import ServeSettings
from tests.unit.registry_helpers import bound_url, uvicorn_in_thread

PROMPT_TOKENS = 95
ADMIN_KEY = "lpx_admin-key-for-the-billing-tests-0123456789"


@dataclass
class StubEngine:
    """Answers like vLLM; `"stub": "hang"` in a body makes it wait for its client to leave
    (after two events, for a stream)."""

    bodies: list[dict] = field(default_factory=list)
    hung_up: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> object:
            body = await request.json()
            self.bodies.append(body)
            if body.get("stream"):
                return StreamingResponse(
                    self._events(request, body), media_type="text/event-stream"
                )
            if body.get("stub") == "hang":
                await self._until_gone(request, "non-streamed")
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1}
            return JSONResponse({"choices": [{"index": 0, "message": {}}], "usage": usage})

        return app

    async def _until_gone(self, request: Request, what: str) -> None:
        try:
            while not await request.is_disconnected():
                await asyncio.sleep(0.01)
        finally:  # in a stream, Starlette may cancel this on the disconnect first
            self.hung_up.append(what)

    async def _events(self, request: Request, body: dict) -> AsyncIterator[bytes]:
        continuous = (body.get("stream_options") or {}).get("continuous_usage_stats")
        for count in range(1, 4):
            chunk: dict = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
            if continuous:
                chunk["usage"] = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": count}
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
            if count == 2 and body.get("stub") == "hang":
                await self._until_gone(request, "stream")
                return


@dataclass
class Stack:
    url: str
    engine: StubEngine
    store: TenancyStore
    keys: dict[str, str]

    def post(self, who: str, timeout: float = 10, **body: object) -> httpx.Response:
        payload = {"model": "base", "messages": [{"role": "user", "content": "hi"}], **body}
        headers = {"Authorization": f"Bearer {self.keys[who]}"}
        return httpx.post(
            f"{self.url}/v1/chat/completions", json=payload, headers=headers, timeout=timeout
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    database_url = f"sqlite:///{tmp_path}/loraplex.db"
    store = TenancyStore(shared_engine(database_url))
    keys = {}
    for tenant in ("acme", "globex"):
        store.create_tenant(tenant)
        keys[tenant], _ = store.create_key(tenant)
    keys["admin"] = ADMIN_KEY
    shared = tmp_path / "adapters" / "public" / "shared"
    shared.mkdir(parents=True)
    (shared / "adapter_config.json").write_text("{}")
    (shared / "adapter_model.safetensors").write_bytes(b"")
    engine = StubEngine()
    settings = ServeSettings(
        adapters_dir=tmp_path / "adapters",
        base_model_name="base",
        database_url=database_url,
        admin_key=ADMIN_KEY,  # type: ignore[arg-type]
        backend_api_key="engine-secret",  # type: ignore[arg-type]
        health_check_interval_s=0.2,
    )
    # Port 0 everywhere: the kernel picks free ports, so nothing else can take them first.
    quiet = {"host": "127.0.0.1", "port": 0, "log_level": "warning", "lifespan": "on"}
    with uvicorn_in_thread(uvicorn.Config(engine.app(), **quiet)) as engine_server:  # type: ignore[arg-type]
        assert engine_server.started, "stand-in engine did not start"
        router = create_app(settings, bound_url(engine_server))
        with uvicorn_in_thread(uvicorn.Config(router, **quiet)) as server:  # type: ignore[arg-type]
            assert server.started, "router did not start"
            url = bound_url(server)
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/ready").status_code != 200:
                assert time.monotonic() < deadline, "router never ready"
                time.sleep(0.05)
            yield Stack(url, engine, store, keys)


def _until(condition: object, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_each_tenant_reaches_the_engine_with_its_own_cache_salt(stack: Stack) -> None:
    sent = [
        ("acme", {}),
        ("acme", {"model": "public/shared"}),
        ("acme", {"stream": True}),
        ("globex", {}),
        ("globex", {"model": "public/shared"}),
        ("admin", {}),
        ("acme", {"cache_salt": "user-1"}),
        ("globex", {"cache_salt": "user-1"}),
    ]
    for who, body in sent:
        assert stack.post(who, **body).status_code == 200
    salts = [body["cache_salt"] for body in stack.engine.bodies]
    acme, acme_shared, acme_stream, globex, globex_shared, admin, acme_1, globex_1 = salts
    # One salt per tenant whatever the model (base, public/*) or mode; never another's.
    assert acme == acme_shared == acme_stream
    assert globex == globex_shared
    assert len({acme, globex, admin, acme_1, globex_1}) == 5
    assert all(len(salt) == 64 and int(salt, 16) >= 0 for salt in salts)


BAD_SALTS = [("", "non-empty"), ("a/b", "at most 128"), ("x" * 129, "at most 128"), (7, "string")]


@pytest.mark.parametrize(("salt", "says"), BAD_SALTS)
def test_a_salt_vllm_would_refuse_is_a_400_naming_it(stack: Stack, salt: object, says: str) -> None:
    response = stack.post("acme", cache_salt=salt)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "cache_salt"
    assert says in response.json()["error"]["message"]
    assert stack.engine.bodies == []


def test_open_mode_sends_the_clients_salt_unchanged() -> None:
    salts = CacheSalts("secret")
    assert salts.salt(ANONYMOUS, "mine") is None
    tenant = Principal("tenant", "acme", 1)
    assert salts.salt(tenant, None) == CacheSalts("secret").salt(tenant, None)
    assert salts.salt(tenant, None) != CacheSalts("other").salt(tenant, None)


def test_non_streamed_request_is_closed_and_charged_when_its_client_leaves(stack: Stack) -> None:
    stack.store.set_quota("acme", tokens_per_minute=1000)
    with pytest.raises(httpx.ReadTimeout):
        stack.post("acme", timeout=0.5, max_tokens=600, stub="hang")
    # The router closed its backend request (vLLM aborts a request whose client leaves)...
    _until(lambda: stack.engine.hung_up == ["non-streamed"])
    time.sleep(0.5)  # the charge is settled just after
    # ...and charged the most it could have generated: 600 of the 1000 tokens are gone.
    assert stack.post("acme", max_tokens=500).status_code == 429
    assert stack.post("acme", max_tokens=300).status_code == 200
    assert stack.post("globex", max_tokens=600).status_code == 200


def test_cut_stream_is_charged_for_what_it_received(stack: Stack) -> None:
    stack.store.set_quota("acme", tokens_per_minute=100)
    headers = {"Authorization": f"Bearer {stack.keys['acme']}"}
    messages = [{"role": "user", "content": "hi"}]
    payload = {
        "model": "base",
        "messages": messages,
        "stream": True,
        "max_tokens": 5,
        "stub": "hang",
    }
    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", json=payload, headers=headers, timeout=10
    ) as stream:
        events = []
        for line in stream.iter_lines():
            if line:
                events.append(json.loads(line.removeprefix("data: ")))
            if len(events) == 2:
                break  # the client leaves before the stream's end (and its usage chunk)
    assert stack.engine.bodies[0]["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    assert events == [{"choices": [{"index": 0, "delta": {"content": "x"}}]}] * 2  # no usage
    _until(lambda: stack.engine.hung_up == ["stream"])
    time.sleep(0.5)  # the charge is settled just after
    # 95 prompt + 2 completion tokens of the 100 are charged: 20 more may not start.
    refused = stack.post("acme", max_tokens=20)
    assert refused.status_code == 429, refused.text
    assert stack.post("globex", max_tokens=20).status_code == 200
