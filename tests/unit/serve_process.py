"""A `loraplex serve` subprocess for tests: its command line, a clean environment, and the
wait until it answers HTTP (shared by the tests that start the real CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import httpx


def serve_command(port: int, *flags: str) -> list[str]:
    """`loraplex serve --port PORT FLAGS...`, run by this interpreter."""
    return [sys.executable, "-m", "loraplex.cli", "serve", "--port", str(port), *flags]


def clean_env() -> dict[str, str]:
    """This process's environment without any LORAPLEX_* setting a developer may have set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}


def wait_answering(
    process: subprocess.Popen,
    url: str,
    path: str,
    timeout_s: float,
    output: Callable[[], str],
) -> None:
    """Poll `url + path` until it answers 200.

    Fails if the process exits first or `timeout_s` passes; `output()` (the router's
    log, or what it wrote) goes into either failure message.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"router exited:\n{output()}"
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"router not answering {path} after {timeout_s:g} s:\n{output()}")
