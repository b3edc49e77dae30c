"""EngineSupervisor against fake engines: restarts with backoff, crash loop, hung engines;
and what `loraplex serve` makes of it: exit code 1 on a crash loop, `loraplex ready` logged
only once the router listens and a backend answers.

The fake engine (fake_vllm_engine.py) answers /health and has a child standing in for
vLLM's engine core, so the process-group handling is real.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client import REGISTRY

from loraplex import cli
from loraplex.serving.supervisor import EngineSupervisor, RestartPolicy
from loraplex.serving.vllm_backend import (
    VLLMBackendProcess,
    cpu_list_text,
    cpu_share,
    replica_environment,
    vllm_command,
)
from loraplex.settings import ServeSettings
from tests.unit.registry_helpers import free_port

FAKE_ENGINE = Path(__file__).with_name("fake_vllm_engine.py")
FAST = RestartPolicy(
    backoff_initial_s=0.4,
    backoff_max_s=0.8,
    crash_loop_restarts=3,
    crash_loop_window_s=60.0,
    stable_after_s=60.0,
    admission_s=0.5,
    unhealthy_grace_s=1.0,
    start_timeout_s=20.0,
    poll_interval_s=0.05,
    health_timeout_s=0.5,
)


def fake_engine(mode: str = "serve") -> VLLMBackendProcess:
    port = free_port()
    return VLLMBackendProcess([sys.executable, str(FAKE_ENGINE), str(port), mode], os.environ, port)


def metric(name: str, replica: str) -> float:
    return REGISTRY.get_sample_value(name, {"replica": replica}) or 0.0


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Fatal:
    """Records the supervisor's on_fatal calls."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)


@pytest.fixture
def supervise() -> Iterator[Callable[..., tuple[EngineSupervisor, Fatal]]]:
    started: list[EngineSupervisor] = []

    def make(*engines: VLLMBackendProcess, policy: RestartPolicy = FAST):
        fatal = Fatal()
        supervisor = EngineSupervisor(engines, policy, on_fatal=fatal)
        supervisor.start()
        started.append(supervisor)
        return supervisor, fatal

    yield make
    for supervisor in started:
        supervisor.stop()


def family(engine: VLLMBackendProcess) -> list[psutil.Process]:
    """The engine's server process and its descendants (the fake engine core)."""
    root = psutil.Process(engine.pid)
    return [root, *root.children(recursive=True)]


def test_a_killed_engine_is_restarted_after_a_doubling_backoff(supervise) -> None:
    engine = fake_engine()
    supervisor, fatal = supervise(engine)
    supervisor.wait_until_any_up(20)
    restarts = metric("loraplex_engine_restarts_total", "0")
    assert metric("loraplex_engine_up", "0") == 1
    for expected_backoff_s in (0.4, 0.8):
        old = engine.pid
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: supervisor.states() == ["down"])
        assert supervisor.restarting()
        assert metric("loraplex_engine_up", "0") == 0
        wait_for(lambda old=old: engine.pid != old)
        waited_s = time.monotonic() - killed_at
        assert expected_backoff_s <= waited_s < expected_backoff_s + 2.0
        wait_for(lambda: supervisor.states() == ["up"])
        assert supervisor.restarting()  # up, but the router may not route to it yet
        wait_for(lambda: not supervisor.restarting())
        assert time.monotonic() - killed_at >= expected_backoff_s + FAST.admission_s
    assert httpx.get(f"{engine.url}/health").status_code == 200
    assert metric("loraplex_engine_restarts_total", "0") == restarts + 2
    assert metric("loraplex_engine_up", "0") == 1
    assert fatal.reasons == []


def test_a_crash_loop_calls_on_fatal_and_restarts_no_more(supervise) -> None:
    engine = fake_engine()
    supervisor, fatal = supervise(engine, policy=FAST)
    supervisor.wait_until_any_up(20)
    for _ in range(FAST.crash_loop_restarts):
        old = engine.pid
        os.kill(old, signal.SIGKILL)
        wait_for(lambda old=old: engine.pid != old and supervisor.states() == ["up"])
    assert fatal.reasons == []
    restarts = metric("loraplex_engine_restarts_total", "0")
    os.kill(engine.pid, signal.SIGKILL)
    wait_for(lambda: fatal.reasons != [])
    assert "crash loop" in fatal.reasons[0]
    assert supervisor.failure == fatal.reasons[0]
    assert supervisor.states() == ["failed"]
    assert not supervisor.restarting()
    time.sleep(FAST.backoff_max_s + 0.5)  # no restart comes, however long one waits
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{engine.url}/health")
    assert metric("loraplex_engine_restarts_total", "0") == restarts
    with pytest.raises(RuntimeError, match="crash loop"):
        supervisor.wait_until_any_up(1)


@pytest.mark.parametrize("how", ["fail", "hang"])
def test_an_engine_failing_health_while_alive_is_killed_and_restarted(supervise, how) -> None:
    engine = fake_engine()
    supervisor, fatal = supervise(engine)
    supervisor.wait_until_any_up(20)
    hung = family(engine)
    assert len(hung) == 2  # the server and its engine core
    wait_for(lambda: not supervisor.restarting())
    failing_at = time.monotonic()
    httpx.post(f"{engine.url}/{how}")
    wait_for(supervisor.restarting, 5)  # failing /health: about to be restarted
    wait_for(lambda: supervisor.states() == ["down"])
    assert time.monotonic() - failing_at >= FAST.unhealthy_grace_s
    wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in hung), 5)
    wait_for(lambda: supervisor.states() == ["up"])
    assert engine.pid != hung[0].pid
    assert httpx.get(f"{engine.url}/health").status_code == 200
    assert fatal.reasons == []


def test_an_engine_that_fails_its_first_start_is_fatal_at_once(supervise) -> None:
    engine = fake_engine("exit")
    supervisor, fatal = supervise(engine)
    with pytest.raises(RuntimeError, match="failed to start: exited with code 3"):
        supervisor.wait_until_any_up(20)
    assert fatal.reasons and supervisor.states() == ["failed"]
    assert metric("loraplex_engine_up", "0") == 0


def test_restarting_while_engines_start_and_serving_once_one_is_up(supervise) -> None:
    slow, quick = fake_engine("slow-start"), fake_engine()
    supervisor, _ = supervise(slow, quick)
    assert supervisor.urls == [slow.url, quick.url]
    assert supervisor.restarting()
    supervisor.wait_until_any_up(20)
    assert supervisor.states() == ["starting", "up"]
    assert supervisor.restarting()
    wait_for(lambda: supervisor.states() == ["up", "up"])
    wait_for(lambda: not supervisor.restarting())


def test_stop_leaves_no_process_behind(supervise) -> None:
    engines = [fake_engine(), fake_engine()]
    supervisor, _ = supervise(*engines)
    wait_for(lambda: supervisor.states() == ["up", "up"])
    processes = [p for engine in engines for p in family(engine)]
    assert len(processes) == 4
    supervisor.stop()
    assert supervisor.states() == ["stopped", "stopped"]
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert alive == []
    for engine in engines:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{engine.url}/health")


# -- each replica's share of the machine ------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "replicas", "binds"),
    [
        (range(16), 2, ["0-7", "8-15"]),
        (range(2), 2, ["0", "1"]),
        (range(10), 3, ["0-3", "4-6", "7-9"]),
        ([0, 2, 4, 6], 2, ["0,2", "4,6"]),
        (range(2), 3, ["0", "1", "0"]),  # more replicas than cores: they share
    ],
)
def test_replicas_split_the_cpus(cpus, replicas, binds) -> None:
    assert [cpu_list_text(cpu_share(i, replicas, list(cpus))) for i in range(replicas)] == binds


def test_one_replica_keeps_vllms_defaults_and_more_get_one_gpu_each(monkeypatch) -> None:
    assert replica_environment(0, 1) == {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [replica_environment(i, 2)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES" not in replica_environment(1, 2)
    assert replica_environment(1, 2)["VLLM_CPU_OMP_THREADS_BIND"]


def test_engine_slots_default_to_32_on_cpu_and_8_on_gpu(monkeypatch) -> None:
    def slots(**settings: object) -> str:
        command = vllm_command(ServeSettings(**settings))
        return command[command.index("--max-loras") + 1]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert slots() == "32"  # CPU: a slot costs memory, not kernel time
    assert slots(max_cpu_loras=16) == "16"  # vLLM refuses more slots than its CPU cache
    assert slots(max_loras=4) == "4"
    for blank in ("", "auto"):  # as the Helm chart and compose render the default
        monkeypatch.setenv("LORAPLEX_MAX_LORAS", blank)
        assert slots() == "32"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert slots() == "8"


# -- loraplex serve ----------------------------------------------------------------------


def serve_flags(tmp_path: Path, port: int) -> list[str]:
    """A router on `port` with its own database; the base model folder is never read."""
    return [
        "serve",
        "--port",
        str(port),
        "--database-url",
        f"sqlite:///{tmp_path}/loraplex.db",
        "--adapters-dir",
        str(tmp_path / "adapters"),
        "--base-model",
        str(tmp_path),
    ]


def test_serve_exits_1_when_its_engine_crash_loops(monkeypatch, tmp_path, caplog) -> None:
    engine = fake_engine()
    policy = dataclasses.replace(FAST, crash_loop_restarts=1)

    def supervisor_of_fake_engine(cls, settings, on_fatal=None) -> EngineSupervisor:
        return cls([engine], policy, on_fatal)

    monkeypatch.setattr(EngineSupervisor, "from_settings", classmethod(supervisor_of_fake_engine))
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)  # keep caplog's handler
    caplog.set_level(logging.INFO)

    def logged(text: str) -> bool:
        return any(text in record.getMessage() for record in caplog.records)

    def crash_twice() -> None:
        wait_for(lambda: logged("loraplex ready"), 30)
        with httpx.Client() as client:
            for _ in range(2):
                old = engine.pid
                os.kill(old, signal.SIGKILL)
                wait_for(lambda old=old: engine.pid != old or logged("crash loop"))
                wait_for(lambda: logged("crash loop") or engine.is_healthy(client))

    threading.Thread(target=crash_twice, daemon=True).start()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        started = time.monotonic()
        assert cli.main(serve_flags(tmp_path, free_port())) == 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert time.monotonic() - started < 30
    assert logged("vLLM engine 0 crash loop: exited with signal SIGKILL after 1 restarts")
    assert engine.pid is None  # stopped, not restarted


def test_serve_logs_ready_only_once_a_backend_answers(tmp_path) -> None:
    port, backend = free_port(), fake_engine()
    backend_port = backend.url.rsplit(":", 1)[1]
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "loraplex.cli", *serve_flags(tmp_path, port)]
    command += [
        "--backend-url",
        f"http://127.0.0.1:{backend_port}",
        "--health-check-interval-s",
        "0.5",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "router listening but not ready" in log_path.read_text(), 60)
        assert "loraplex ready" not in log_path.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 503
        backend.start()
        wait_for(lambda: "loraplex ready" in log_path.read_text(), 30)
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
        backend.stop()
    text = log_path.read_text()
    assert text.index("Uvicorn running") < text.index("not ready") < text.index("loraplex ready")
    assert exit_code == 0
