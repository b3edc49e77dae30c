"""Scale-out and self-healing with real engines: `loraplex serve --replicas 2` answers like
one engine; killing one engine's core under load fails no request and the engine comes back
and takes traffic; with one engine only, requests get a quick 503 with Retry-After until
it is back.

CI has 2 cores: the engines are small (16 sequences, 512-token context, 1 GiB KV cache),
the two replicas are shared by the first two tests, and the single-engine test reuses the
session's server (a plain `loraplex serve`, one engine) and leaves it healthy.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    BASE_NAME,
    START_TIMEOUT_S,
    Server,
    free_port,
    stop_serve,
)
from tests.sse import adata_events

pytestmark = pytest.mark.integration

PROMPTS = ["Write one sentence about the ocean.", "List three fruits.", "Describe a cat."]
MODELS = [BASE_NAME, "demo/alpha", "demo/beta"]
# A restarted engine on 2 busy cores takes one to three minutes to load again.
RESTART_TIMEOUT_S = 400


@dataclass
class Replicas:
    url: str
    engine_urls: list[str]
    process: subprocess.Popen
    log_path: Path


def two_free_ports() -> int:
    """A port p with p + 1 free too (the replicas listen on backend_port + i)."""
    while True:
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def replicas(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """`loraplex serve --replicas 2` over the session server's demo adapters."""
    port, backend_port = free_port(), two_free_ports()
    state = tmp_path_factory.mktemp("replicas")
    log_path = state / "serve.log"
    env = dict(
        os.environ,
        LORAPLEX_ADAPTERS_DIR=str(server.adapters_dir),
        LORAPLEX_DATABASE_URL=f"sqlite:///{state}/loraplex.db",
        LORAPLEX_REGISTRY_STORE=str(state / "store"),
        LORAPLEX_REGISTRY_CACHE_DIR=str(state / "cache"),
    )
    command = [
        sys.executable,
        "-m",
        "loraplex.cli",
        "serve",
        "--replicas",
        "2",
        "--port",
        str(port),
        "--backend-port",
        str(backend_port),
        "--dtype",
        "float32",  # token-for-token equal to the session server's engine
        "--max-loras",
        "2",
        "--max-num-seqs",
        "16",
        "--max-model-len",
        "512",
        "--health-check-interval-s",
        "1",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    engine_urls = [f"http://127.0.0.1:{backend_port + i}" for i in range(2)]
    try:
        wait_until(lambda: ready_replicas(url) == 2, START_TIMEOUT_S, process, log_path)
    except BaseException:
        process.kill()
        raise
    yield Replicas(url, engine_urls, process, log_path)
    stop_serve(process, "loraplex serve --replicas 2")


def wait_until(condition, timeout_s: float, process=None, log_path=None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"loraplex serve exited:\n{log_path.read_text()[-5000:]}")
        if time.monotonic() > deadline:
            tail = log_path.read_text()[-5000:] if log_path else ""
            pytest.fail(f"not reached within {timeout_s:.0f} s\n{tail}")
        time.sleep(0.5)


def ready_replicas(url: str) -> int:
    """Replicas up according to the router's /ready (0 when it is not ready)."""
    try:
        response = httpx.get(f"{url}/ready", timeout=5)
    except httpx.HTTPError:
        return 0
    return response.json()["replicas"]["up"] if response.status_code == 200 else 0


def metric_sum(url: str, sample_name: str, **labels: str) -> float:
    """Sum of a metric's samples on a /metrics page (0 when absent or unreachable)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def engine_core(engine_url: str) -> psutil.Process:
    """The vLLM EngineCore process under the API server listening on `engine_url`'s port."""
    port = int(engine_url.rsplit(":", 1)[1])
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "vllm.entrypoints.openai.api_server" in cmdline and str(port) in cmdline:
            cores = [c for c in process.children(recursive=True) if "EngineCore" in c.name()]
            assert len(cores) == 1, cores
            return cores[0]
    raise AssertionError(f"no vLLM API server on port {port}")


async def tokens(client: httpx.AsyncClient, url: str, model: str, prompt: str) -> list[str]:
    response = await client.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16,
            "temperature": 0,
            "logprobs": True,
        },
    )
    assert response.status_code == 200, response.text
    return [entry["token"] for entry in response.json()["choices"][0]["logprobs"]["content"]]


def test_two_replicas_answer_token_for_token_like_one_engine(
    replicas: Replicas, server: Server
) -> None:
    jobs = [(model, prompt) for prompt in PROMPTS for model in MODELS]

    async def run() -> tuple[list[list[str]], list[list[str]]]:
        async with httpx.AsyncClient(timeout=120) as client:
            one = [await tokens(client, server.url, m, p) for m, p in jobs]
            two = await asyncio.gather(*(tokens(client, replicas.url, m, p) for m, p in jobs))
        return one, list(two)

    one_engine, two_replicas = asyncio.run(run())
    assert two_replicas == one_engine
    assert all(one_engine)
    # Both replicas answered some of them (base requests go to the least loaded).
    served = [metric_sum(u, "vllm:request_success_total") for u in replicas.engine_urls]
    assert all(count > 0 for count in served), served


@dataclass
class Load:
    """Requests through the router until told to stop, and how each ended."""

    url: str
    statuses: Counter
    streams: Counter
    done: int = 0
    stop: bool = False

    async def requests(self, client: httpx.AsyncClient, worker: int) -> None:
        while not self.stop:
            model = MODELS[(worker + self.done) % len(MODELS)]
            body = {"model": model, "prompt": PROMPTS[worker % 3], "max_tokens": 12}
            try:
                response = await client.post(f"{self.url}/v1/completions", json=body)
                self.statuses[response.status_code] += 1
            except httpx.HTTPError as exc:
                self.statuses[type(exc).__name__] += 1
            self.done += 1

    async def stream(self, client: httpx.AsyncClient, worker: int) -> None:
        while not self.stop:
            body = {"model": MODELS[worker % 3], "prompt": PROMPTS[0], "max_tokens": 48}
            events: list[str] = []
            try:
                async with client.stream(
                    "POST", f"{self.url}/v1/completions", json={**body, "stream": True}
                ) as response:
                    async for data in adata_events(response):
                        events.append(data)
                self.streams[stream_ending(response.status_code, events)] += 1
            except httpx.HTTPError as exc:
                self.streams[type(exc).__name__] += 1


def stream_ending(status: int, events: list[str]) -> str:
    """complete | error_event (an error event, then [DONE]) | cut | status_NNN."""
    if status != 200:
        return f"status_{status}"
    if not events or events[-1] != "[DONE]":
        return "cut"
    errors = [e for e in events[:-1] if "error" in json.loads(e)]
    return "error_event" if errors else "complete"


def test_killing_one_engine_under_load_fails_no_request_and_it_comes_back(
    replicas: Replicas,
) -> None:
    victim = replicas.engine_urls[1]
    core = engine_core(victim)
    load = Load(replicas.url, Counter(), Counter())

    async def run() -> float:
        async with httpx.AsyncClient(timeout=120) as client:
            workers = [asyncio.create_task(load.requests(client, i)) for i in range(16)]
            workers += [asyncio.create_task(load.stream(client, i)) for i in range(3)]
            # Traffic first: the retry budget is a share of the last minute's requests.
            while load.done < 100:
                await asyncio.sleep(0.2)
            before = load.done
            core.kill()
            killed_at = time.monotonic()
            # Keep the load on while the router fails over and ejects the dead replica.
            while time.monotonic() - killed_at < 15 or load.done < before + 50:
                await asyncio.sleep(0.2)
            load.stop = True
            await asyncio.gather(*workers)
            return killed_at

    started = time.monotonic()
    asyncio.run(run())
    print(f"load: {load.done} requests {dict(load.statuses)}, streams {dict(load.streams)}")
    assert set(load.statuses) == {200}, load.statuses
    assert "cut" not in load.streams and set(load.streams) <= {"complete", "error_event"}
    log = replicas.log_path.read_text()
    assert '"vLLM engine exited with code' in log or '"vLLM engine exited with signal' in log
    wait_until(lambda: ready_replicas(replicas.url) == 2, RESTART_TIMEOUT_S, replicas.process)
    print(f"replica back and admitted {time.monotonic() - started:.0f} s after the kill")
    assert engine_core(victim).pid != core.pid
    assert metric_sum(replicas.url, "loraplex_engine_restarts_total", replica="1") == 1
    # The other engine, busy with the failed-over load, was never taken for a hung one.
    assert metric_sum(replicas.url, "loraplex_engine_restarts_total", replica="0") == 0
    assert metric_sum(replicas.url, "loraplex_engine_up", replica="1") == 1

    # It takes traffic again: its own (fresh) request counter moves.
    async def batch() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            jobs = [(m, p) for p in PROMPTS for m in MODELS] * 2
            await asyncio.gather(*(tokens(client, replicas.url, m, p) for m, p in jobs))

    deadline = time.monotonic() + 60
    while metric_sum(victim, "vllm:request_success_total") == 0:
        assert time.monotonic() < deadline, "the restarted replica got no request"
        asyncio.run(batch())


def test_with_one_engine_killed_requests_get_503_retry_after_until_it_is_back(
    server: Server,
) -> None:
    body = {"model": BASE_NAME, "prompt": "List three fruits.", "max_tokens": 8}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/v1/completions", json=body).status_code == 200
        engine_core(server.backend_url).kill()
        statuses: Counter = Counter()
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            sent = time.monotonic()
            response = client.post("/v1/completions", json=body)
            took = time.monotonic() - sent
            statuses[response.status_code] += 1
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "backend_unavailable"
            assert int(response.headers["Retry-After"]) >= 1
            assert took < 5, f"a 503 took {took:.1f} s"
            assert client.get("/health").status_code == 200  # restarting: alive
            assert time.monotonic() < deadline, f"engine not back: {statuses}"
            time.sleep(1)
        print(f"until the engine was back: {dict(statuses)}")
        assert statuses[503] >= 1
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.get("/ready").status_code == 200
