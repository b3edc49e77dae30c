"""What vLLM will serve: rules checked on an adapter's peft config before training and at publish.

vLLM reads only `r`, `lora_alpha`, `target_modules` and rsLoRA from
`adapter_config.json` and silently drops the rest, so an adapter trained with
anything else either fails to load or, worse, loads and computes something
different from what was trained. Each rule returns a message saying what to change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ranks vLLM's LoRA kernels accept (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Weight files in Python's pickle format (torch.save and friends): loading one can run
# any code its author chose, inside the engine. The registry takes safetensors only.
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def pickled_weight_files(folder: Path) -> list[str]:
    """Names of the files in `folder` (not its subfolders) that hold pickled weights."""
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.suffix.lower() in PICKLED_WEIGHT_SUFFIXES and not entry.is_dir()
    )


def pickle_problem(name: str) -> str:
    """Why a pickled weight file is refused, and how to convert it."""
    return (
        f"{name}: pickled weights are refused (loading a pickle can run arbitrary code); "
        "only safetensors are accepted: re-save the adapter with peft's "
        "save_pretrained(..., safe_serialization=True) and remove this file"
    )


@dataclass(frozen=True)
class BaseModelRef:
    """A base model as an adapter was trained on it, or as a server runs it."""

    id: str
    weights_sha256: str | None = None


@dataclass(frozen=True)
class CompatProblem:
    rule: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class IncompatibleAdapter(ValueError):
    """The adapter cannot be served by vLLM as configured; the message lists every problem."""

    def __init__(self, problems: list[CompatProblem]) -> None:
        self.problems = problems
        super().__init__(
            "adapter not servable by vLLM:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def check_adapter_config(
    config: Mapping[str, Any],
    *,
    max_lora_rank: int,
    known_modules: Collection[str] | None = None,
    adapter_base: BaseModelRef | None = None,
    served_base: BaseModelRef | None = None,
) -> list[CompatProblem]:
    """Every reason vLLM would refuse (or silently misserve) this peft adapter config.

    `known_modules`: the linear module names of the base architecture (None skips the
    check). `adapter_base`/`served_base`: the base the adapter was trained on and the
    one it is about to be served on (None skips the check).
    """
    problems: list[CompatProblem] = []

    def problem(rule: str, field: str, message: str) -> None:
        problems.append(CompatProblem(rule, field, message))

    raw_type = config.get("peft_type", "LORA")
    # peft's in-memory config holds an enum; adapter_config.json holds its string value.
    peft_type = str(getattr(raw_type, "value", raw_type)).upper()
    if peft_type != "LORA":
        problem(
            "peft_type",
            "peft_type",
            f"{peft_type} is not served by vLLM (prompt/prefix tuning and other methods are "
            "not supported); train a LoRA adapter (peft LoraConfig) instead",
        )
        return problems  # the remaining rules are about LoRA fields
    if config.get("modules_to_save"):
        problem(
            "modules_to_save",
            "modules_to_save",
            f"{config['modules_to_save']} are fully trained copies of base modules, which vLLM "
            "cannot serve; remove modules_to_save (do not resize embeddings or add tokens)",
        )
    if config.get("use_dora"):
        problem("dora", "use_dora", "vLLM does not serve DoRA; set use_dora to false")
    bias = config.get("bias", "none")
    if bias != "none":
        problem(
            "bias", "bias", f"bias={bias!r} trains base biases vLLM ignores; set bias to 'none'"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or rank not in VLLM_LORA_RANKS:
        problem("rank", "r", f"r={rank!r} is not a rank vLLM serves; use one of {VLLM_LORA_RANKS}")
    elif rank > max_lora_rank:
        problem(
            "max_rank",
            "r",
            f"r={rank} is greater than max_lora_rank={max_lora_rank}; lower r to at most "
            f"{max_lora_rank} or serve with --max-lora-rank {rank}",
        )
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            problem(
                field,
                field,
                f"vLLM ignores {field} and would serve a different adapter than was trained; "
                "use one r and lora_alpha for every module",
            )
    targets = config.get("target_modules")
    if not targets:
        problem("target_modules", "target_modules", "no target modules; list the projections")
    elif isinstance(targets, str):
        problem(
            "target_modules",
            "target_modules",
            f"{targets!r} is a pattern; list module names explicitly (e.g. ['q_proj', 'v_proj'])",
        )
    elif known_modules is not None:
        unknown = sorted(set(targets) - set(known_modules))
        if unknown:
            problem(
                "target_modules",
                "target_modules",
                f"{unknown} are not linear modules of the base model; choose from "
                f"{sorted(known_modules)}",
            )
    if adapter_base is not None and served_base is not None:
        same_hash = (
            adapter_base.weights_sha256 is None
            or served_base.weights_sha256 is None
            or adapter_base.weights_sha256 == served_base.weights_sha256
        )
        if not same_hash or adapter_base.id != served_base.id:
            problem(
                "base_model",
                "base_model",
                f"adapter was trained on {adapter_base.id} "
                f"(weights {str(adapter_base.weights_sha256)[:12]}) but the server runs "
                f"{served_base.id} (weights {str(served_base.weights_sha256)[:12]}); retrain on "
                "the served base model or serve it on the one it was trained on",
            )
    return problems


def ensure_servable(config: Mapping[str, Any], **kwargs: Any) -> None:
    """Raise IncompatibleAdapter listing every problem `check_adapter_config` finds."""
    problems = check_adapter_config(config, **kwargs)
    if problems:
        raise IncompatibleAdapter(problems)
