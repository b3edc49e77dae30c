"""Publishing an adapter folder as a new immutable version.

Everything is checked before anything becomes visible: required files (weights in
safetensors only: a pickled `.bin`/`.pt` is refused, pickles can run code on load), size,
the compat rules vLLM needs (compat.py), and, when the adapter carries a
manifest, that it was trained on the base model being served (by weights hash),
and, when a quality policy is given (the CLI always gives one), the quality gate
(quality_gate.py). Then the files go to the store (complete or not at all), and only
then does one catalog transaction add the version and move @latest. A rejected
publish changes nothing and lists every reason.

A blob already in the store is hashed before it is reused: a corrupted one is
replaced, so publishing the same folder again repairs every version that uses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from loraplex.adapters.blob_store import BlobStore, stored_blob_problem
from loraplex.adapters.catalog import Catalog, CatalogLookupError, VersionRecord
from loraplex.adapters.compat import (
    BaseModelRef,
    check_adapter_config,
    pickle_problem,
    pickled_weight_files,
)
from loraplex.adapters.content import VersionContent, scan_adapter_dir
from loraplex.adapters.lifecycle import continue_numbering, remove_if_empty
from loraplex.adapters.local_store import ADAPTER_CONFIG
from loraplex.adapters.manifest import MANIFEST_FILE, AdapterManifest
from loraplex.adapters.names import AdapterName
from loraplex.adapters.quality_gate import GateDecision, judge
from loraplex.adapters.quality_records import record_gate
from loraplex.adapters.refs import AdapterRef

Progress = Callable[[str], None]

# The one weight file a published version may carry (local_store also serves peft's
# pickled adapter_model.bin from a local folder; the registry does not take it).
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"


class PublishRejected(ValueError):
    """The folder cannot be published; `problems` names the file or field of each reason."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{path} cannot be published:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class PublishChecks:
    max_lora_rank: int
    max_bytes: int
    served_base: BaseModelRef | None = None
    """The base model being served; None skips the base-model match."""
    known_modules: Collection[str] | None = None
    """Linear module names of the served base; None skips the target-module check."""


@dataclass(frozen=True)
class CheckedAdapter:
    content: VersionContent
    manifest: dict[str, Any] | None


def check_adapter_dir(path: Path, checks: PublishChecks) -> CheckedAdapter:
    """Hash the folder and check it can be served; raises PublishRejected listing every problem."""
    if not path.is_dir():
        raise PublishRejected(path, [f"{path}: not a folder"])
    problems: list[str] = []
    config: dict[str, Any] | None = None
    if not (path / ADAPTER_CONFIG).is_file():
        problems.append(f"{ADAPTER_CONFIG}: missing (not a peft adapter folder)")
    else:
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            problems.append(f"{ADAPTER_CONFIG}: unreadable JSON ({exc})")
            config = None
    pickled = pickled_weight_files(path)
    problems += [pickle_problem(name) for name in pickled]
    if (path / SAFETENSORS_WEIGHTS).is_file():
        problems += _check_safetensors(path / SAFETENSORS_WEIGHTS)
    elif not pickled:
        problems.append(f"{SAFETENSORS_WEIGHTS}: missing (no adapter weights)")

    manifest: AdapterManifest | None = None
    if (path / MANIFEST_FILE).is_file():
        try:
            manifest = AdapterManifest.model_validate_json((path / MANIFEST_FILE).read_text())
        except ValueError as exc:
            first = str(exc).splitlines()[0:3]
            problems.append(f"{MANIFEST_FILE}: invalid ({' '.join(first)})")

    content = scan_adapter_dir(path)
    if content.size > checks.max_bytes:
        problems.append(
            f"{path}: adapter files total {content.size / 2**20:.1f} MiB, over the "
            f"{checks.max_bytes / 2**20:.0f} MiB limit (registry_max_adapter_mib)"
        )
    if config is not None:
        adapter_base = (
            BaseModelRef(manifest.base_model.id, manifest.base_model.weights_sha256)
            if manifest is not None
            else None
        )
        for problem in check_adapter_config(
            config,
            max_lora_rank=checks.max_lora_rank,
            known_modules=checks.known_modules,
            adapter_base=adapter_base,
            served_base=checks.served_base if adapter_base is not None else None,
        ):
            where = MANIFEST_FILE if problem.rule == "base_model" else ADAPTER_CONFIG
            problems.append(f"{where}: {problem}")
    if problems:
        raise PublishRejected(path, problems)
    return CheckedAdapter(content, manifest.model_dump(mode="json") if manifest else None)


def _check_safetensors(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="numpy") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header
        return [f"{file.name}: unreadable safetensors file ({exc})"]
    if not any("lora_A" in k for k in keys) or not any("lora_B" in k for k in keys):
        return [f"{file.name}: holds no lora_A/lora_B weights"]
    return []


@dataclass(frozen=True)
class QualityPolicy:
    """How publish applies the quality gate (quality_gate.py)."""

    min_gain: float = 0.0
    """Required gain of the adapter over its best few-shot baseline, in metric units."""
    force: bool = False
    """Publish even when the gate refuses; the decision is recorded with `forced_by`."""
    forced_by: str | None = None
    """Who forced it (user@host for the CLI), stored in the catalog."""


@dataclass(frozen=True)
class PublishResult:
    record: VersionRecord
    created: bool
    """False when @latest already had these bytes (nothing new was published)."""
    repaired: bool = False
    """The store held this content corrupted; it was replaced with the folder's files."""
    gate: GateDecision | None = None
    """The quality gate's decision (None: no policy given, or nothing new published)."""


def _latest_digest(catalog: Catalog, name: AdapterName) -> str | None:
    try:
        return catalog.resolve(AdapterRef(name)).digest
    except CatalogLookupError:  # no such adapter yet, or no @latest
        return None


def publish(
    path: Path,
    name: AdapterName,
    *,
    catalog: Catalog,
    store: BlobStore,
    checks: PublishChecks,
    quality: QualityPolicy | None = None,
    progress: Progress | None = None,
) -> PublishResult:
    """Check, gate, upload (or verify and repair) and register `path` as the next version.

    Raises PublishRejected or QualityGateRefused before anything changes.
    """
    say = progress or (lambda _: None)
    say(f"checking {path}")
    checked = check_adapter_dir(path, checks)
    digest = checked.content.digest
    say(f"content sha256 {digest[:12]}, {checked.content.size / 1e6:.1f} MB")
    decision = None
    # Republishing what @latest already is publishes nothing new (it may repair the blob):
    # the gate judged that version when it was published.
    if quality is not None and _latest_digest(catalog, name) != digest:
        decision = judge(
            checked.manifest,
            min_gain=quality.min_gain,
            force=quality.force,
            forced_by=quality.forced_by,
        )
        say(f"quality gate: {decision.reason}")
    repaired = False
    if store.has(digest):
        problem = stored_blob_problem(store, digest)
        if problem is None:
            say(f"blob already in the store {store.describe()} (verified)")
        else:
            say(f"blob in the store fails verification ({problem}): replacing it")
            store.put(digest, checked.content, path, say, replace=True)
            repaired = True
    else:
        say(f"uploading to {store.describe()}")
        store.put(digest, checked.content, path, say)
    continued = continue_numbering(catalog, name)
    try:
        record, created = catalog.add_version(name, digest, checked.content.size, checked.manifest)
    except BaseException:
        if continued:
            remove_if_empty(catalog, name)  # no empty entry left shadowing a folder
        raise
    if created and decision is not None:
        # A second transaction after the version's: a failure here is reported (the
        # publish command exits non-zero) with the version already published.
        record_gate(catalog, name, record.number, decision)
    return PublishResult(record, created, repaired, decision if created else None)


def publish_adapter(
    path: Path,
    name: AdapterName,
    *,
    catalog: Catalog,
    store: BlobStore,
    checks: PublishChecks,
    progress: Progress | None = None,
) -> tuple[VersionRecord, bool]:
    """`publish` without the quality gate: (version, created), created False when @latest
    already has these bytes. For tests and benchmarks that publish generated adapters."""
    result = publish(path, name, catalog=catalog, store=store, checks=checks, progress=progress)
    return result.record, result.created
