"""The adapter manifest: what an adapter was trained on, from what data, and how well it does.

Written as `manifest.json` beside `adapter_config.json`. The base model is pinned
by a content hash of its weights (computed by the caller: this package does not
read models), and the tokenizer and chat template by their own hashes, because
an adapter served with a different template sees different tokens.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def loraplex_version() -> str:
    try:
        return version("loraplex")
    except PackageNotFoundError:
        return "unknown"


class BaseModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    id: str
    """Name of the base model (its folder name or hub id)."""
    weights_sha256: str
    """sha256 of the base weights file."""
    tokenizer_sha256: str
    """sha256 of tokenizer.json."""
    chat_template_sha256: str
    """sha256 of the chat template text the training data was rendered with."""


class DatasetInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    train_sha256: str
    """sha256 of the training JSONL file."""
    train_examples: int
    """Examples used for training (after skipping too-long ones)."""
    eval_sha256: str | None = None
    """sha256 of the held-out JSONL file, if one was given."""
    eval_examples: int = 0
    """Held-out examples."""


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    schema_version: int = SCHEMA_VERSION
    """Version of this schema."""
    name: str
    """Adapter name, `tenant/name` or `name`."""
    base_model: BaseModelInfo
    """The base model the adapter was trained on."""
    peft_config: dict[str, Any]
    """The adapter_config.json contents."""
    training_config: dict[str, Any]
    """The resolved training config."""
    dataset: DatasetInfo
    """The data the adapter was trained and evaluated on."""
    eval: dict[str, float] = Field(default_factory=dict)
    """Held-out metric per setting, e.g. {"base": 0.0, "base_few_shot_3": 0.2, "adapter": 0.9}."""
    created_at: str = Field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    """UTC creation time, ISO 8601."""
    loraplex_version: str = Field(default_factory=loraplex_version)
    """Version of loraplex that wrote the adapter."""

    def write(self, adapter_dir: Path) -> Path:
        path = adapter_dir / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path


def read_manifest(adapter_dir: Path) -> AdapterManifest:
    return AdapterManifest.model_validate_json((adapter_dir / MANIFEST_FILE).read_text())
