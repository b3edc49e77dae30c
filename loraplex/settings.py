"""Settings shared by the CLI, the backend launcher and the router.

One pydantic settings object; every field can come from a `LORAPLEX_<FIELD>`
environment variable or from the matching `--flag` of `loraplex serve`.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "loraplex"


def _default_registry_store() -> str:
    return str(default_cache_dir() / "registry")


class ServeSettings(BaseSettings):
    """How `loraplex serve` runs the router and its vLLM backend."""

    model_config = SettingsConfigDict(
        env_prefix="LORAPLEX_", extra="ignore", use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Address the router listens on."""
    port: int = Field(8000, ge=1, le=65535)
    """Port the router listens on."""
    base_model: str = ""
    """Base model: a local Hugging Face folder or hub id. Empty = the embedded SmolLM2."""
    model_cache: Path = Field(default_factory=lambda: default_cache_dir() / "models")
    """Folder of the embedded SmolLM2: `loraplex model pull` writes it, the rest read it."""
    base_model_name: str = "SmolLM2-135M-Instruct"
    """Name clients send as `model` to reach the base model without an adapter."""
    adapters_dir: Path = Field(default_factory=lambda: default_cache_dir() / "adapters")
    """Folder of servable adapters: `<dir>/<tenant>/<name>/adapter_config.json`."""
    backend_url: str = ""
    """Comma-separated URLs of already-running vLLM servers; empty = start local children."""
    backend_port: int = Field(8100, ge=1, le=65535)
    """Loopback port of the vLLM child process."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "bfloat16"
    """Weights/activations dtype of the base model in vLLM (float32 to match peft exactly)."""
    max_loras: int | None = Field(None, ge=1)
    """Adapters vLLM can hold in one batch (engine slots). Unset (or `auto`): 32 on CPU (at most
    max_cpu_loras), 8 on GPU. On CPU a slot costs memory (~20 MB for this base model at
    r=16), not kernel time, and vLLM batches requests of at most this many adapters:
    traffic spread over 32 adapters ran 1.5-1.9x faster with 32 slots than with 8, and
    the base model alone as fast (bench/RESULTS.md)."""
    max_cpu_loras: int = Field(32, ge=1)
    """Adapters vLLM keeps in its host-memory cache."""
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    """Largest adapter rank the engine accepts."""
    max_model_len: int = Field(2048, ge=64)
    """Context length per request (prompt + completion)."""
    kv_cache_gib: int = Field(1, ge=1)
    """KV cache size for vLLM on CPU (VLLM_CPU_KVCACHE_SPACE), in GiB."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences vLLM batches together."""
    cpu_lora_kernels: Literal["loraplex", "loraplex-torch", "vllm"] = "loraplex"
    """Multi-LoRA ops on CPU: loraplex's fused C++ kernel (falling back to its grouped torch
    ops where it cannot be built), only the grouped torch ops, or vLLM's per-token ops."""
    backend_start_timeout_s: float = Field(600.0, gt=0)
    """How long to wait for the vLLM child to report healthy."""
    backend_timeout_s: float = Field(600.0, gt=0)
    """Read timeout for one request to the backend."""
    # ---- scale-out: backends as a set, picker, health, failover, engine supervision ----
    backend_discovery: str = ""
    """`dns:HOST:PORT` (e.g. a Kubernetes headless Service): the backends are the host's
    addresses, re-resolved every `discovery_interval_s`. Empty = `backend_url` / local children."""
    discovery_interval_s: float = Field(5.0, gt=0)
    """How often `backend_discovery` is re-resolved, in seconds."""
    replicas: int = Field(1, ge=1)
    """Local vLLM children `loraplex serve` starts, on ports backend_port, backend_port+1, ..."""
    picker: Literal["affinity", "round-robin"] = "affinity"
    """How a request's replica is chosen: adapter-aware (rendezvous hashing with bounded
    load) or round-robin (for comparison)."""
    picker_load_factor: float = Field(1.25, ge=1.0)
    """Bounded load: never pick a replica above this × the mean in-flight while another is below."""
    picker_spill_in_flight: float = Field(4.0, gt=0)
    """In-flight requests of one adapter per home replica above which it spreads to one more."""
    health_check_interval_s: float = Field(2.0, gt=0)
    """Seconds between active health checks (GET /health) of every backend."""
    eject_after_failures: int = Field(3, ge=1)
    """Consecutive transport errors, 502/503/504s or failed probes before a backend is ejected."""
    readmit_after_successes: int = Field(2, ge=1)
    """Consecutive passing health checks before an ejected backend takes traffic again."""
    retry_budget_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Share of requests (per rolling minute) that may be retried on another backend; a
    quiet router may still retry 10 a minute. 0 = never retry."""
    engine_restart_backoff_max_s: float = Field(30.0, gt=0)
    """Longest wait before restarting a crashed vLLM child (1 s, doubling up to this)."""
    engine_crash_loop_restarts: int = Field(5, ge=1)
    """Restarts within `engine_crash_loop_window_s` after which `loraplex serve` exits non-zero."""
    engine_crash_loop_window_s: float = Field(600.0, gt=0)
    """Window of the crash-loop count, in seconds."""
    database_url: str = ""
    """SQLAlchemy URL of the catalog/tenancy database; empty = SQLite file in the cache."""
    registry_store: str = Field(default_factory=_default_registry_store)
    """Adapter registry blobs: a folder or s3://bucket/prefix; empty = <cache>/registry."""
    registry_s3_endpoint_url: str = ""
    """Endpoint of an S3-compatible store (MinIO, Ceph); empty = AWS. Credentials: AWS_* env."""
    registry_cache_dir: Path = Field(default_factory=lambda: default_cache_dir() / "registry-cache")
    """Local disk cache of verified registry versions, the folders vLLM loads from."""
    registry_cache_gib: float = Field(10.0, gt=0)
    """Size of the registry cache; least recently used versions are removed beyond it."""
    registry_max_adapter_mib: int = Field(1024, ge=1)
    """Largest adapter (all its files) that `adapters publish` accepts, in MiB."""
    admin_key: SecretStr = SecretStr("")
    """Admin API key (manages tenants, keys, quotas; calls every model). From the environment
    or `admin_key_file` only: a secret is never a flag (flags show in `ps`)."""
    admin_key_file: Path | None = None
    """File holding the admin key (e.g. a mounted secret), read at start; a trailing newline
    is stripped. Set it or `admin_key`, not both."""
    backend_api_key: SecretStr = SecretStr("")
    """Shared secret between the router and its vLLM engines (vLLM's API key, given to
    the engine as VLLM_API_KEY): the router sends it as a bearer token on every request.
    Empty = a random key per `loraplex serve` for the engines it starts; external engines
    (`backend_url`, `backend_discovery`) get it only if set (set the same value on them)."""
    allow_open_access: bool = False
    """Serve without API keys even on a non-loopback address when no tenant/key exists."""
    metrics_max_label_values: int = Field(200, ge=1)
    """Distinct adapter (and tenant) label values per metric; later ones count as `other`."""
    max_request_body_mib: int = Field(8, ge=1)
    """Largest request body the router reads, in MiB; larger ones get 413 `request_too_large`."""
    max_header_kib: int = Field(64, ge=1)
    """Largest request line plus headers the router reads, in KiB; larger: 400 and closed."""
    header_timeout_s: float = Field(10.0, gt=0)
    """Time a client has to send a request's line and headers; then the connection is closed."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the router (JSON lines on stderr)."""

    @field_validator("max_lora_rank", mode="before")
    @classmethod
    def _rank_from_text(cls, value: object) -> object:
        # A Literal of ints does not match the text of LORAPLEX_MAX_LORA_RANK=32 by itself.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("max_loras", mode="before")
    @classmethod
    def _blank_slots_is_the_platform_default(cls, value: object) -> object:
        # LORAPLEX_MAX_LORAS="" (a blank deploy value, as the Helm chart renders) or "auto"
        # means the platform's default, not a parse error.
        return None if isinstance(value, str) and value.strip() in ("", "auto") else value

    @field_validator("registry_store")
    @classmethod
    def _empty_store_is_the_default(cls, value: str) -> str:
        # LORAPLEX_REGISTRY_STORE="" (a blank deploy variable) means the default, never `.`.
        return value or _default_registry_store()

    @model_validator(mode="after")
    def _admin_key_from_file(self) -> ServeSettings:
        if self.admin_key_file is None:
            return self
        if self.admin_key.get_secret_value():
            raise ValueError("set admin_key or admin_key_file, not both")
        try:
            key = self.admin_key_file.read_text().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"admin_key_file {self.admin_key_file} cannot be read: {exc}"
            ) from None
        if not key:
            raise ValueError(f"admin_key_file {self.admin_key_file} is empty")
        self.admin_key = SecretStr(key)
        return self

    def with_local_engine_key(self) -> ServeSettings:
        """These settings, with a random `backend_api_key` when it is empty and the engines
        are local children (nobody else needs to know it); else unchanged."""
        if self.backend_api_key.get_secret_value() or self.backend_url or self.backend_discovery:
            return self
        return self.model_copy(update={"backend_api_key": SecretStr(secrets.token_urlsafe(32))})

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        # Imported here: loraplex.database pulls SQLAlchemy and Alembic, +0.55 s on every
        # `loraplex` command (measured with -X importtime), most of which never open it.
        from loraplex.database import sqlite_url

        return sqlite_url(default_cache_dir() / "loraplex.db")

    def base_model_path(self) -> str:
        """The base model the backend loads: `base_model_dir` without pulling."""
        # Imported here, not at the top: base_model.py imports this module (for the
        # model_cache setting), so a top-level import would be a cycle.
        from loraplex.base_model import base_model_dir

        return str(base_model_dir(self.base_model, self.model_cache, pull=False))
