"""deploy/compose.yaml run for real with podman-compose: the backend, router and Prometheus
services up on the compose network, the router answering for the base model and a demo
adapter, Prometheus scraping the router (with the admin key) and the engine (found by DNS),
and `podman-compose down -v` leaving nothing of the project behind.

Grafana and Alertmanager are left out: their images cannot be pulled here. Prometheus is
deploy/docker/Dockerfile.prometheus (Debian's package on the local base image), given to
compose through PROMETHEUS_IMAGE. Skipped only where podman or podman-compose cannot run.
What this machine needs beyond compose.yaml, and why, is in docs/deploy.md
("Compose with podman").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import BASE_NAME, free_port
from tests.integration.test_containers import (
    ENV,
    IMAGE,
    greedy_answer,
    podman,
    podman_problem,
    router_ready,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_IMAGE = "localhost/loraplex-prometheus:bookworm"
SERVICES = ("backend", "router", "prometheus")
BUILD_TIMEOUT_S = 3600  # as test_containers.py: a cached `make image` takes a minute
READY_TIMEOUT_S = 420  # engine start: 1-3 minutes on 2 busy cores
SCRAPE_TIMEOUT_S = 90  # prometheus.yml scrapes every 15 s
ADAPTER = "demo/alpha"


def compose_problem() -> str | None:
    """Why podman-compose cannot run containers here, or None."""
    if problem := podman_problem():
        return problem
    if shutil.which("podman-compose") is None:
        return "podman-compose is not installed (scripts/install-services.sh installs it)"
    result = subprocess.run(
        ["podman-compose", "version"], capture_output=True, text=True, timeout=60, env=ENV
    )
    if result.returncode != 0:
        return f"podman-compose cannot run here: {result.stderr.strip().splitlines()[-1:]}"
    return None


def container_limits(image: str) -> dict[str, int]:
    """The hard limits a container gets here by default: no container may ask for more.

    This machine's runc cannot raise a limit beyond them (setrlimit fails with EPERM, even
    as root), and podman adds a raised process limit to every container that names any
    ulimit, so compose.yaml's `nofile: 65536` makes the backend fail to start."""
    limits = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "cat", image, "/proc/self/limits"
    )
    found = {}
    for name, key in (("Max open files", "nofile"), ("Max processes", "nproc")):
        match = re.search(rf"^{name}\s+\S+\s+(\d+)", limits, re.M)
        assert match, limits
        found[key] = int(match.group(1))
    return found


@dataclass
class Compose:
    project: str
    files: list[Path]
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        return subprocess.run(
            ["podman-compose", "-p", self.project, *files, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=ROOT,
        )

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"  # podman-compose 1.0's naming

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, volumes and networks of the project that still exist."""
        label = f"label=io.podman.compose.project={self.project}"
        containers = podman("ps", "--all", "--filter", label, "--format", "{{.Names}}")
        volumes = podman("volume", "ls", "--filter", label, "--format", "{{.Name}}")
        networks = podman("network", "ls", "--filter", label, "--format", "{{.Name}}")
        found = {
            "containers": containers.split(),
            "volumes": volumes.split(),
            "networks": networks.split(),
        }
        return {kind: names for kind, names in found.items() if names}

    def down(self) -> subprocess.CompletedProcess[str]:
        return self("down", "--volumes")

    def remove_networks(self) -> None:
        """podman-compose 1.0's `down` leaves the network its `up` created."""
        for network in self.leftovers().get("networks", []):
            podman("network", "rm", "--force", network, check=False)

    def logs(self) -> str:
        return "\n".join(
            f"--- {service}\n{podman('logs', '--tail', '30', self.container(service), check=False)}"
            for service in SERVICES
        )


@dataclass
class Stack:
    compose: Compose
    router_url: str
    prometheus_url: str
    admin_key: str

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.router_url}/v1",
            api_key=key or self.admin_key,
            max_retries=0,
            timeout=120,
        )

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(
            f"{self.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10
        )
        response.raise_for_status()
        return response.json()["data"]["result"]


def _build_images() -> None:
    """`make image` (cached layers: only what changed is rebuilt) and the Prometheus image on
    the same Debian base."""
    for command in (
        [str(ROOT / "scripts" / "build-image.sh")],
        ["bash", "-c", "exec podman build --network host --layers -q "
         "-f deploy/docker/Dockerfile.prometheus "
         '--build-arg BASE_IMAGE="$(scripts/base-image.sh)" '
         f"-t {PROMETHEUS_IMAGE} deploy/docker"],
    ):  # fmt: skip
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            env={**ENV, "IMAGE": IMAGE},
            cwd=ROOT,
        )
        assert result.returncode == 0, f"{command} failed:\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if problem := compose_problem():
        pytest.skip(problem)
    _build_images()

    work = tmp_path_factory.mktemp("compose")
    admin_key = os.urandom(16).hex()
    key_file = work / "admin-key"
    key_file.write_text(admin_key + "\n")
    key_file.chmod(0o644)  # Prometheus's user reads it through the bind mount
    limits = container_limits(PROMETHEUS_IMAGE)
    override = work / "compose.limits.yaml"
    override.write_text(
        json.dumps(  # JSON is YAML
            {
                "services": {
                    "backend": {
                        "ulimits": {
                            key: {"soft": value, "hard": value} for key, value in limits.items()
                        }
                    }
                }
            }
        )
    )
    router_port, prometheus_port = free_port(), free_port()
    env = {
        key: value
        for key, value in ENV.items()
        if not key.startswith(("LORAPLEX_", "PROMETHEUS_", "GRAFANA_", "ALERTMANAGER_"))
    }
    env.update(
        LORAPLEX_ADMIN_KEY=admin_key,
        LORAPLEX_ADMIN_KEY_FILE=str(key_file),
        LORAPLEX_ROUTER_PORT=str(router_port),
        PROMETHEUS_PORT=str(prometheus_port),
        PROMETHEUS_IMAGE=PROMETHEUS_IMAGE,
    )
    compose = Compose(
        # Its own project: nothing shared with a developer's stack (`loraplex`) or another run.
        project=f"lptest{os.getpid()}",
        files=[DEPLOY / "compose.yaml", DEPLOY / "compose.podman.yaml", override],
        env=env,
    )
    try:
        # --no-build: the image `make image` built, never compose's own build of it.
        up = compose("up", "--detach", "--no-build", *SERVICES)
        states = {
            service: podman(
                "inspect", "--format", "{{.State.Status}}", compose.container(service), check=False
            )
            for service in SERVICES
        }
        assert up.returncode == 0 and set(states.values()) == {"running"}, (
            f"podman-compose up: {states}\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        )
        # The router finds the engine, and Prometheus both, by service name.
        network = f"{compose.project}_default"
        if podman("network", "inspect", "--format", "{{.DNSEnabled}}", network) != "true":
            pytest.fail(
                f"{network} resolves no service names: podman's CNI networks need the dnsname "
                "plugin (golang-github-containernetworking-plugin-dnsname; "
                "scripts/install-services.sh installs it), netavark networks aardvark-dns"
            )
        # The demo adapters, written into the volume the router and the engine share.
        demo = podman(
            "exec", compose.container("router"), "loraplex", "adapters", "demo", timeout=300
        )
        assert ADAPTER in demo, demo
        stack = Stack(
            compose,
            f"http://127.0.0.1:{router_port}",
            f"http://127.0.0.1:{prometheus_port}",
            admin_key,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not router_ready(stack.router_url):
            states = {
                service: podman(
                    "inspect", "--format", "{{.State.Status}}", compose.container(service)
                )
                for service in SERVICES
            }
            if set(states.values()) != {"running"} or time.monotonic() > deadline:
                pytest.fail(f"compose stack not ready ({states}):\n{compose.logs()}")
            time.sleep(2)
        yield stack
    finally:
        compose.down()
        compose.remove_networks()


def test_router_answers_for_the_base_model_and_a_demo_adapter(stack: Stack):
    client = stack.client()
    models = {model.id for model in client.models.list().data}
    assert {BASE_NAME, ADAPTER} <= models, models
    base = greedy_answer(client, BASE_NAME)
    assert "Paris" in base, base
    # The adapter, loaded by the engine from the shared volume, changes the answer.
    assert greedy_answer(client, ADAPTER) != base
    with pytest.raises(openai.AuthenticationError):
        stack.client("wrong").models.list()


def test_prometheus_scrapes_the_router_with_the_admin_key_and_the_engine_by_dns(stack: Stack):
    # A request of its own, so the test does not depend on the order tests run in.
    greedy_answer(stack.client(), ADAPTER)
    want = {
        'up{job="loraplex-router"}': "1",
        'up{job="loraplex-vllm"}': "1",
        f'sum(loraplex_requests_total{{adapter="{ADAPTER}",status="200"}}) > 0': None,
    }
    seen: dict[str, list[dict]] = {}
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while time.monotonic() < deadline:
        seen = {query: stack.query(query) for query in want}
        if all(
            result and (value is None or result[0]["value"][1] == value)
            for (query, value), result in zip(want.items(), seen.values(), strict=True)
        ):
            break
        time.sleep(3)
    else:
        targets = httpx.get(f"{stack.prometheus_url}/api/v1/targets", timeout=10).json()
        health = [
            (t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"])
            for t in targets["data"]["activeTargets"]
        ]
        pytest.fail(f"Prometheus saw {seen}\ntargets: {health}")


def test_compose_down_removes_every_container_volume_and_network(stack: Stack):
    assert {"containers", "volumes", "networks"} <= set(stack.compose.leftovers())
    result = stack.compose.down()
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(stack.compose.leftovers()) <= {"networks"}, stack.compose.leftovers()
    stack.compose.remove_networks()
    assert stack.compose.leftovers() == {}
