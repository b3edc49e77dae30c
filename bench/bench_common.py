"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`, so this
module is importable as `bench_common`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def serve_command(port: int, *flags: str) -> list[str]:
    """`loraplex serve --port PORT FLAGS...`, run by this interpreter."""
    return [sys.executable, "-m", "loraplex.cli", "serve", "--port", str(port), *flags]


def wait_ready(url: str, process: subprocess.Popen, path: str = "/ready") -> bool:
    """Poll `url + path` until it answers 200; False if the process exits or 10 min pass."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


# The CPU features that change what these numbers mean (SIMD widths, bf16/AMX units).
_ISA_PREFIXES = ("sse4", "avx", "fma", "amx")


def machine() -> dict:
    """The machine a result was measured on: CPU model, cores, SIMD/AMX flags, Python."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = fields.get("flags", "").split()
    return {
        "cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "isa_flags": sorted(flag for flag in flags if flag.startswith(_ISA_PREFIXES)),
        "python": platform.python_version(),
    }


def write_report(report: dict, out: Path) -> None:
    """The benchmark's JSON, next to the others in bench/results/."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


@contextlib.contextmanager
def stub_and_router(*router_flags: str) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """An instant stub backend (bench/stub_backend.py) and `loraplex serve` in front of it;
    yields their URLs and the router's process, and stops both."""
    stub_port, port = free_port(), free_port()
    stub, router = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{port}"
    script = Path(__file__).with_name("stub_backend.py")
    processes = [subprocess.Popen([sys.executable, str(script), str(stub_port)])]
    try:
        if not wait_ready(stub, processes[0], "/health"):
            raise RuntimeError("stub backend failed to start")
        command = serve_command(
            port,
            "--backend-url",
            stub,
            "--base-model",
            "unused",
            "--log-level",
            "warning",
            *router_flags,
        )
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        if not wait_ready(router, processes[1]):
            raise RuntimeError("router failed to start")
        yield stub, router, processes[1]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
