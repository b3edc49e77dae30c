"""Container entry point: one image, two roles.

    entrypoint.py router       the loraplex router, in front of the backends found through
                               LORAPLEX_BACKEND_DISCOVERY (dns:HOST:PORT) or LORAPLEX_BACKEND_URL
    entrypoint.py backend      a vLLM OpenAI server with the loraplex plugin
    entrypoint.py healthcheck  probe /health of the role this container runs
    entrypoint.py CMD ...      anything else runs as is (`loraplex tenants create acme`)

The backend command line and environment come from the same code that
`loraplex serve` uses for its child process (loraplex.serving.vllm_backend), so a
flag added there reaches containers too. The one difference: in a container the
backend must listen on the pod/container network (the router runs elsewhere), not
on loopback; network policy, not the bind address, keeps clients away from it.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

# The healthcheck runs as a separate process; this file tells it which role to probe.
ROLE_FILE = Path(os.environ.get("LORAPLEX_ROLE_FILE", "/tmp/loraplex-role"))
ROLES = ("router", "backend")


def backend_command() -> tuple[list[str], dict[str, str]]:
    """argv and environment of the vLLM server for the LORAPLEX_* settings in the environment."""
    from loraplex.serving.vllm_backend import vllm_command, vllm_environment
    from loraplex.settings import ServeSettings

    settings = ServeSettings()
    command = vllm_command(settings)
    command[command.index("--host") + 1] = os.environ.get("LORAPLEX_BACKEND_HOST", "0.0.0.0")
    return command, vllm_environment(settings)


def router_command() -> list[str]:
    if not (os.environ.get("LORAPLEX_BACKEND_DISCOVERY") or os.environ.get("LORAPLEX_BACKEND_URL")):
        # Without either `loraplex serve` would start its own vLLM child inside the router
        # container, which is the single-container mode, not this role.
        raise SystemExit(
            "router role needs LORAPLEX_BACKEND_DISCOVERY (e.g. dns:backend:8100) "
            "or LORAPLEX_BACKEND_URL (e.g. http://backend:8100)"
        )
    os.environ.setdefault("LORAPLEX_HOST", "0.0.0.0")
    return ["loraplex", "serve"]


def health_url(role: str) -> str:
    if role == "backend":
        return f"http://127.0.0.1:{os.environ.get('LORAPLEX_BACKEND_PORT', '8100')}/health"
    return f"http://127.0.0.1:{os.environ.get('LORAPLEX_PORT', '8000')}/health"


def healthcheck() -> int:
    role = ROLE_FILE.read_text().strip() if ROLE_FILE.is_file() else "router"
    try:
        with urllib.request.urlopen(health_url(role), timeout=5) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{role} unhealthy: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> int:
    role = argv[0] if argv else os.environ.get("LORAPLEX_ROLE", "router")
    if role == "healthcheck":
        return healthcheck()
    if role not in ROLES:
        os.execvp(argv[0], argv)
    ROLE_FILE.write_text(role)
    if role == "backend":
        command, env = backend_command()
        os.execvpe(command[0], command, env)
    command = router_command()
    os.execvp(command[0], command)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
