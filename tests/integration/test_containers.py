"""The CPU image built and run for real: `make image`'s build, then its backend and router
roles as two containers (podman, host network, loopback ports) answering like the
non-container server, as non-root, stopping on SIGTERM, and the router's 503 once its
engine is gone.

Skipped only where podman cannot run. On a machine that built the image before, the build
reuses every layer but the source's (scripts/build-image.sh; podman keeps its layers in
/var/lib/containers, outside the clone).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import Server, alive, descendants, free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "loraplex:cpu"
CONTAINER_UID = 10001  # USER of deploy/docker/Dockerfile.cpu
BUILD_TIMEOUT_S = 3600  # a first build downloads torch and vLLM; a cached one takes a minute
READY_TIMEOUT_S = 600
STOP_LIMIT_S = 30
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]

# Podman's settings for this kind of machine (runc, cgroupfs, no ulimits), unless the
# caller has its own.
ENV = {"CONTAINERS_CONF": str(ROOT / "deploy" / "docker" / "containers.conf"), **os.environ}


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr[-3000:]}")
    return result.stdout.strip()


def podman_problem() -> str | None:
    """Why podman cannot run containers here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/install-services.sh installs it, as root)"
    result = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=60, env=ENV)
    if result.returncode != 0:
        return f"podman cannot run here: {result.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    if problem := podman_problem():
        pytest.skip(problem)
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**ENV, "IMAGE": IMAGE},
        cwd=ROOT,
    )
    assert result.returncode == 0, f"make image failed:\n{result.stderr[-5000:]}"
    return IMAGE


@dataclass
class Stack:
    backend: str
    router: str
    router_url: str
    admin_key: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.router_url}/v1", api_key=self.admin_key, max_retries=0, timeout=120
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{podman('logs', '--tail', '40', name, check=False)}"
            for name in (self.backend, self.router)
        )


def run_container(name: str, image: str, role: str, env: dict[str, str], *volumes: str) -> None:
    podman(
        "run",
        "--detach",
        "--name",
        name,
        # Loopback ports on the host's network: nothing is published beyond it.
        "--network",
        "host",
        # vLLM's engine core exchanges tensors through shared memory (64 MB by default).
        "--shm-size",
        "1g",
        *(arg for key, value in env.items() for arg in ("--env", f"{key}={value}")),
        *(arg for volume in volumes for arg in ("--volume", volume)),
        image,
        role,
    )


@pytest.fixture(scope="module")
def stack(image: str, server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("containers")
    # The host server's demo adapters, readable by the containers' user (pytest's folders
    # are private to root). Both containers see them at the same path: the router registers
    # adapters with the engine by path.
    adapters = work / "adapters"
    shutil.copytree(server.adapters_dir, adapters)
    secrets = work / "secrets"
    secrets.mkdir()
    admin_key = os.urandom(16).hex()
    (secrets / "admin-key").write_text(admin_key + "\n")
    for path in [work, *work.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    suffix = f"{os.getpid()}-{time.monotonic_ns()}"
    backend, router = f"loraplex-test-backend-{suffix}", f"loraplex-test-router-{suffix}"
    port, backend_port = free_port(), free_port()
    # The router's key for the engine, given to both (external engines get it only if set).
    shared = {"LORAPLEX_BACKEND_API_KEY": os.urandom(16).hex()}
    adapters_volume = f"{adapters}:/var/lib/loraplex/adapters:ro"
    try:
        run_container(
            backend,
            image,
            "backend",
            {
                **shared,
                "LORAPLEX_BACKEND_HOST": "127.0.0.1",
                "LORAPLEX_BACKEND_PORT": str(backend_port),
                # float32 like the host server, so both give the same tokens.
                "LORAPLEX_DTYPE": "float32",
                "LORAPLEX_MAX_LORAS": "4",
                "LORAPLEX_MAX_NUM_SEQS": "32",
                "LORAPLEX_KV_CACHE_GIB": "1",
            },
            adapters_volume,
        )
        run_container(
            router,
            image,
            "router",
            {
                **shared,
                "LORAPLEX_HOST": "127.0.0.1",
                "LORAPLEX_PORT": str(port),
                "LORAPLEX_BACKEND_URL": f"http://127.0.0.1:{backend_port}",
                "LORAPLEX_ADMIN_KEY_FILE": "/run/secrets/admin-key",
            },
            adapters_volume,
            f"{secrets / 'admin-key'}:/run/secrets/admin-key:ro",
        )
        stack = Stack(backend, router, f"http://127.0.0.1:{port}", admin_key)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not router_ready(stack.router_url):
            states = {
                n: podman("inspect", "--format", "{{.State.Status}}", n) for n in (backend, router)
            }
            if any(state != "running" for state in states.values()) or time.monotonic() > deadline:
                pytest.fail(f"containers not ready ({states}):\n{stack.logs()}")
            time.sleep(2)
        yield stack
    finally:
        for name in (backend, router):
            podman("rm", "--force", "--time", "0", name, check=False)


def router_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def greedy_answer(client: openai.OpenAI, model: str) -> str:
    """The model's greedy answer to PROMPT (16 tokens at most)."""
    completion = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=16, temperature=0
    )
    return completion.choices[0].message.content or ""


def test_router_container_answers_like_the_host_server(stack: Stack, server: Server):
    adapter = server.adapter_names[0]
    for model in (server.client.models.list().data[0].id, adapter):
        expected = greedy_answer(server.client, model)
        assert greedy_answer(stack.client(), model) == expected, model
    # The adapter really took part: it answers differently from the base model.
    base = server.client.models.list().data[0].id
    assert greedy_answer(stack.client(), adapter) != greedy_answer(stack.client(), base)
    # The admin key from the mounted file is required.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{stack.router_url}/v1", api_key="wrong", max_retries=0
        ).models.list()


def container_processes(name: str) -> dict[int, int]:
    """pid -> real uid of the container's processes, read from the host's /proc."""
    init = int(podman("inspect", "--format", "{{.State.Pid}}", name))
    uids = {}
    for pid in {init, *descendants(init)}:
        status = Path(f"/proc/{pid}/status").read_text()
        uids[pid] = int(
            next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]
        )
    return uids


def test_image_keeps_the_dockerfiles_healthcheck(image: str):
    # Podman's default OCI format drops HEALTHCHECK; compose and docker users rely on it.
    healthcheck = json.loads(
        podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image)
    )
    assert healthcheck["Test"] == ["CMD", "python", "/opt/loraplex/entrypoint.py", "healthcheck"]


def test_container_processes_run_as_non_root(stack: Stack):
    backend, router = container_processes(stack.backend), container_processes(stack.router)
    # tini, the vLLM API server and its engine core; tini and the router.
    assert len(backend) >= 3 and len(router) >= 2, (backend, router)
    assert set(backend.values()) | set(router.values()) == {CONTAINER_UID}


def _stop(name: str) -> tuple[float, int]:
    """SIGTERM (podman stop), SIGKILL only after STOP_LIMIT_S: seconds taken, exit code."""
    start = time.monotonic()
    podman("stop", "--time", str(STOP_LIMIT_S), name, timeout=STOP_LIMIT_S + 60)
    took = time.monotonic() - start
    return took, int(podman("inspect", "--format", "{{.State.ExitCode}}", name))


def test_sigterm_stops_each_container_and_the_router_answers_503_without_its_engine(
    stack: Stack,
):
    engine_pids = set(container_processes(stack.backend))
    took, code = _stop(stack.backend)
    assert code == 0 and took < STOP_LIMIT_S, (
        f"backend: exit {code} after {took:.1f} s\n{stack.logs()}"
    )
    assert not any(alive(pid) for pid in engine_pids)

    # The engine is gone: the router says so in OpenAI's error shape, with Retry-After.
    deadline = time.monotonic() + 30
    while True:
        response = httpx.post(
            f"{stack.router_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {stack.admin_key}"},
            json={"model": "SmolLM2-135M-Instruct", "messages": PROMPT, "max_tokens": 4},
            timeout=30,
        )
        if response.status_code == 503 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    error = response.json()["error"]
    assert error["message"] and error["type"] and "code" in error and "param" in error
    # Readiness follows the pool's probes: a replica is ejected after 3 failed ones, 2 s
    # apart by default (docs/scaleout.md), so /ready turns 503 within seconds, not at once.
    deadline = time.monotonic() + 20
    while httpx.get(f"{stack.router_url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/ready stayed 200 with the engine gone for 20 s"
        time.sleep(0.5)

    took, code = _stop(stack.router)
    assert code == 0 and took < STOP_LIMIT_S, (
        f"router: exit {code} after {took:.1f} s\n{stack.logs()}"
    )
