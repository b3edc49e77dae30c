"""Billing that cannot be dodged and prefix-cache isolation, on the session's real vLLM
engine behind a router with tenants (`loraplex serve --backend-url`, its own database).

- A stream reaches the client exactly as vLLM would send it without the router, whatever
  usage the client asked for (the router asks for usage on every chunk and takes it out).
- A client that hangs up stops its request in the engine, and a cut stream is charged.
- Tenants never share prefix-cache blocks (per-tenant `cache_salt`), a tenant's own
  repeated prompt still hits the cache."""

from __future__ import annotations

import json
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from loraplex.database import shared_engine
from loraplex.router.tenancy.store import TenancyStore
from tests.integration.conftest import BASE_NAME, Server, router_in_front_of
from tests.sse import data_events

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Name a colour."}]


@dataclass
class BillingRouter:
    url: str
    store: TenancyStore
    engine_url: str
    engine_headers: dict[str, str]
    keys: dict[str, str]

    def post(self, tenant: str, timeout: float = 120, **body: object) -> httpx.Response:
        payload = {"model": BASE_NAME, "messages": QUESTION, "max_tokens": 1, **body}
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        return httpx.post(
            f"{self.url}/v1/chat/completions", json=payload, headers=headers, timeout=timeout
        )

    def engine_metric(self, name: str) -> float:
        """The sum of an engine metric's samples (the engine's own /metrics)."""
        text = httpx.get(f"{self.engine_url}/metrics", headers=self.engine_headers).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((f"{name}{{", f"{name} "))
        )


@pytest.fixture(scope="module")
def router(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BillingRouter]:
    root = tmp_path_factory.mktemp("billing")
    adapters_dir = root / "adapters"
    # The engine's resolver loads local adapters from its own folder (docs/serving.md).
    for folder in (adapters_dir, server.adapters_dir):
        shutil.copytree(
            server.adapters_dir / "demo/alpha", folder / "public/shared", dirs_exist_ok=True
        )
    database_url = f"sqlite:///{root}/loraplex.db"
    store = TenancyStore(shared_engine(database_url))
    keys = {}
    for tenant in ("billa", "billb", "billc"):
        store.create_tenant(tenant)
        keys[tenant], _ = store.create_key(tenant)
    with router_in_front_of(server, root, database_url, adapters_dir) as (url, _, _):
        yield BillingRouter(url, store, server.backend_url, server.engine_headers, keys)


def _chunks(response: httpx.Response) -> list[dict]:
    """The stream's chunks without the fields that differ per request (id, created)."""
    chunks = []
    for data in data_events(response.iter_bytes()):
        if data.startswith("{"):
            chunk = json.loads(data)
            chunks.append({k: v for k, v in chunk.items() if k not in ("id", "created")})
    return chunks


USAGE_OPTIONS = [
    None,
    {"include_usage": True},
    {"include_usage": True, "continuous_usage_stats": True},
]


@pytest.mark.parametrize("options", USAGE_OPTIONS, ids=["none", "final", "every_chunk"])
def test_stream_is_what_vllm_sends_without_the_router(
    router: BillingRouter, options: dict | None
) -> None:
    body: dict = {"model": BASE_NAME, "messages": QUESTION, "max_tokens": 4, "temperature": 0}
    body |= {"stream": True} | ({"stream_options": options} if options else {})
    streams = []
    for url, headers in (
        (router.url, {"Authorization": f"Bearer {router.keys['billa']}"}),
        (router.engine_url, router.engine_headers),
    ):
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120
        ) as response:
            assert response.status_code == 200
            streams.append(_chunks(response))
    through_router, direct = streams
    assert through_router == direct
    assert any("usage" in chunk for chunk in direct) == (options is not None)


def test_client_that_hangs_up_is_stopped_in_the_engine(router: BillingRouter) -> None:
    """A non-streamed request of ~1,900 tokens (minutes on CPU) whose client hangs up once
    it runs in the engine."""
    assert router.engine_metric("vllm:num_requests_running") == 0
    body = json.dumps(
        {"model": BASE_NAME, "messages": QUESTION, "max_tokens": 1900, "ignore_eos": True}
    ).encode()
    host, port = router.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {router.keys['billa']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port))) as client:
        client.sendall(head.encode() + body)
        deadline = time.monotonic() + 120
        while router.engine_metric("vllm:num_requests_running") < 1:
            assert time.monotonic() < deadline, "the request never ran in the engine"
            time.sleep(0.2)
        time.sleep(1)
    # The client is gone: the engine stops its request within seconds, not minutes.
    deadline = time.monotonic() + 15
    while router.engine_metric("vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the engine kept running a request nobody awaits"
        time.sleep(0.2)


def test_stream_cut_by_its_client_is_charged(router: BillingRouter) -> None:
    router.store.set_quota("billc", tokens_per_minute=200)
    # ~250 prompt tokens: more than the quota once charged; max_tokens within it.
    long_question = [{"role": "user", "content": "Repeat: " + "red green blue " * 70}]
    payload = {
        "model": BASE_NAME,
        "messages": long_question,
        "max_tokens": 150,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {router.keys['billc']}"}
    with httpx.stream(
        "POST", f"{router.url}/v1/chat/completions", json=payload, headers=headers, timeout=120
    ) as stream:
        assert stream.status_code == 200
        received = 0
        for data in data_events(stream.iter_bytes()):
            received += data.startswith("{")
            if received == 4:
                break  # role + 3 tokens, then the client hangs up
    deadline = time.monotonic() + 15
    while router.engine_metric("vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the cut stream kept running in the engine"
        time.sleep(0.2)
    time.sleep(0.5)  # the charge is settled as the stream closes
    refused = router.post("billc")
    assert refused.status_code == 429, refused.text
    assert "tokens per minute" in refused.json()["error"]["message"]


def _hits_after(router: BillingRouter, tenant: str, model: str, prompt: str) -> float:
    """The rise of the engine's prefix-cache hit count over one request."""
    before = router.engine_metric("vllm:prefix_cache_hits_total")
    messages = [{"role": "user", "content": prompt}]
    assert router.post(tenant, model=model, messages=messages).status_code == 200
    time.sleep(0.5)  # the engine's counters follow its step loop
    return router.engine_metric("vllm:prefix_cache_hits_total") - before


@pytest.mark.parametrize("model", [BASE_NAME, "public/shared"])
def test_tenants_never_share_prefix_cache(router: BillingRouter, model: str) -> None:
    # ~430 tokens (3 of the CPU engine's 128-token blocks), new to the engine (a random
    # start), identical for both tenants.
    prompt = f"{uuid.uuid4().hex} " + "The quick brown fox jumps over the lazy dog. " * 35
    _hits_after(router, "billa", model, prompt)
    assert _hits_after(router, "billa", model, prompt) >= 256  # its own prefix is cached
    assert _hits_after(router, "billb", model, prompt) == 0  # but not for another tenant
