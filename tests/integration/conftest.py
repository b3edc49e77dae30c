"""One real `loraplex serve` (vLLM on CPU + router) per test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from loraplex.base_model import pull_embedded_model
from loraplex.training.demo_adapters import DEMO_ADAPTERS, ensure_demo_adapters

BASE_NAME = "SmolLM2-135M-Instruct"
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """All live descendants of `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_serve(process: subprocess.Popen, what: str = "loraplex serve") -> None:
    """SIGTERM `process` and fail the test if it, or anything it started, outlives 60 s
    (clean shutdown is part of the contract: no engine left behind)."""
    family = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{what} did not exit within 60 s of SIGTERM")
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = [pid for pid in family if alive(pid)]
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left after SIGTERM: {leftovers}"


@dataclass
class Server:
    url: str
    backend_url: str
    adapters_dir: Path
    model_dir: Path
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    """The environment the server runs with: CLI commands given it reach the same registry."""

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    @property
    def adapter_names(self) -> list[str]:
        return [spec.name for spec in DEMO_ADAPTERS]

    def engine_environment(self) -> dict[str, str]:
        """The environment of the vLLM engine `loraplex serve` started (read from /proc)."""
        port = self.backend_url.rsplit(":", 1)[1]
        for pid in descendants(self.process.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"vllm.entrypoints.openai.api_server" in cmdline and port.encode() in cmdline:
                entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                return dict(e.decode().split("=", 1) for e in entries if b"=" in e)
        raise AssertionError("no vLLM engine under loraplex serve")

    @property
    def engine_headers(self) -> dict[str, str]:
        """What the router sends the engine: its key, random per `loraplex serve`."""
        return {"Authorization": f"Bearer {self.engine_environment()['VLLM_API_KEY']}"}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir = pull_embedded_model()
    adapters_dir = tmp_path_factory.mktemp("adapters")
    ensure_demo_adapters(model_dir, adapters_dir)
    port, backend_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("logs") / "serve.log"
    env = dict(os.environ, LORAPLEX_ADAPTERS_DIR=str(adapters_dir))
    # Its own database (registry catalog; no tenants, so no API keys on loopback) and adapter
    # registry. The registry test sends more adapters than the engine's host cache holds
    # (--max-cpu-loras), so vLLM's own eviction and reloads through the resolver run too.
    registry_dir = tmp_path_factory.mktemp("registry")
    env.update(
        LORAPLEX_DATABASE_URL=f"sqlite:///{registry_dir}/loraplex.db",
        LORAPLEX_REGISTRY_STORE=str(registry_dir / "store"),
        LORAPLEX_REGISTRY_CACHE_DIR=str(registry_dir / "cache"),
    )
    command = [
        sys.executable,
        "-m",
        "loraplex.cli",
        "serve",
        "--port",
        str(port),
        "--backend-port",
        str(backend_port),
        # float32 so served outputs can be compared token for token with peft.
        "--dtype",
        "float32",
        "--max-loras",
        "4",
        "--max-num-seqs",
        "32",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"loraplex serve exited early:\n{log_path.read_text()[-5000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"loraplex serve not ready:\n{log_path.read_text()[-5000:]}")
        time.sleep(1)
    server = Server(
        url, f"http://127.0.0.1:{backend_port}", adapters_dir, model_dir, process, log_path, env
    )
    yield server
    stop_serve(process)


@contextmanager
def router_in_front_of(
    server: Server,
    root: Path,
    database_url: str,
    adapters_dir: Path,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A `loraplex serve --backend-url` router (its own database, adapters folder and
    `flags`) in front of the session server's engine: (url, process, log), ready, and
    stopped after. The engine is external to it, so it gets the engine's key."""
    port = free_port()
    engine_key = server.engine_environment()["VLLM_API_KEY"]
    command = [
        sys.executable,
        "-m",
        "loraplex.cli",
        "serve",
        "--backend-url",
        server.backend_url,
        "--port",
        str(port),
        "--database-url",
        database_url,
        "--adapters-dir",
        str(adapters_dir),
        *flags,
    ]
    log_path = root / "router.log"
    env = dict(os.environ, **(env or {}), LORAPLEX_BACKEND_API_KEY=engine_key)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
    except BaseException:
        process.kill()
        process.wait()
        raise
    yield url, process, log_path
    stop_serve(process, "the router")
