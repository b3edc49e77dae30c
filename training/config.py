"""The training run configuration: one typed object that is also the YAML schema.

A `train.yaml` is a `TrainConfig` written down, and every field is also a
`loraplex train` flag (`--optim.lr 1e-3`) that overrides the file. Unknown keys
are errors that name the key and its line, data paths are relative to the YAML
file (to the working directory when given as flags), and every run writes its
resolved config (`config.yaml`) beside its output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Every linear projection of the Llama architecture (attention and MLP).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESOLVED_CONFIG_FILE = "config.yaml"


class ConfigError(ValueError):
    """A config file is invalid; the message names the file, line and field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class LoraSection(_Section):
    r: int = Field(8, ge=1)
    """LoRA rank; vLLM serves 1, 8, 16, 32, 64, 128, 256, 320, 512 up to its max_lora_rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    """Linear modules to adapt; default every attention and MLP projection."""
    rslora: bool = False
    """Rank-stabilized LoRA scaling (alpha / sqrt(r)); vLLM honours it."""


class OptimSection(_Section):
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on the LoRA weights."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(10, ge=0)
    """Optimizer steps of linear warmup."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(8, ge=1)
    """Examples per micro-batch."""
    grad_accumulation: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this value (null: no clipping)."""


class EvalSection(_Section):
    split: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the training data held out when no eval_data file is given."""
    interval: int = Field(50, ge=1)
    """Optimizer steps between held-out loss evaluations."""
    metric: Literal["exact_match", "json_match"] = "exact_match"
    """Generation metric: exact_match compares stripped text, json_match parsed JSON values."""
    max_new_tokens: int = Field(48, ge=1)
    """Tokens generated per held-out example."""
    max_examples: int | None = Field(None, ge=1)
    """Score at most this many held-out examples (the first ones)."""
    few_shot: int = Field(3, ge=0)
    """k for the few-shot baseline (base model prompted with k training examples); 0 skips it."""
    baselines: bool = True
    """Also score the base model (and the few-shot baseline) after training."""


class TrainConfig(_Section):
    """One adapter trained on one task."""

    name: str
    """Adapter name, `tenant/name` or `name`; recorded in the manifest."""
    base_model: str = ""
    """Base model folder; empty = the embedded SmolLM2-135M-Instruct (pulled if needed)."""
    train_data: Path
    """Training JSONL: chat (`{"messages": [...]}`) or `{"prompt", "completion"}` lines."""
    eval_data: Path | None = None
    """Held-out JSONL in the same formats; default: `eval.split` of train_data."""
    output_dir: Path | None = None
    """Run folder (adapter, manifest, config, metrics, plot, checkpoints); default runs/<name>."""
    max_seq_length: int = Field(512, ge=8)
    """Longest rendered example in tokens."""
    too_long: Literal["skip", "truncate"] = "skip"
    """What to do with longer examples; truncation keeps the start and drops the rest."""
    seed: int = 0
    """Seed for LoRA init, data order and dropout: same seed, same adapter."""
    checkpoint_interval: int = Field(100, ge=1)
    """Optimizer steps between checkpoints."""
    keep_checkpoints: int = Field(2, ge=1)
    """Most recent checkpoints kept on disk."""
    resume: bool = True
    """Continue from the last checkpoint in output_dir when there is one."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many held-out loss evaluations without improvement; the adapter keeps
    the weights of the best evaluation (also when max_steps ends the run first, or it resumed)."""
    max_lora_rank: int = Field(16, ge=1)
    """The serving max_lora_rank the adapter must fit (checked before training)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto = CUDA when available."""
    cpu_threads: int | None = Field(None, ge=1)
    """torch threads on CPU; null = torch's default (all cores). 1 is faster on a busy machine."""
    lora: LoraSection = Field(default_factory=LoraSection)
    """LoRA settings."""
    optim: OptimSection = Field(default_factory=OptimSection)
    """Optimization settings."""
    eval: EvalSection = Field(default_factory=EvalSection)
    """Held-out evaluation settings."""

    @model_validator(mode="after")
    def _default_output_dir(self) -> TrainConfig:
        if self.output_dir is None:
            self.output_dir = Path("runs") / self.name
        return self

    @property
    def run_dir(self) -> Path:
        assert self.output_dir is not None  # set by the validator
        return self.output_dir

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def write_resolved(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RESOLVED_CONFIG_FILE
        path.write_text(self.to_yaml())
        return path


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (or its nearest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == key]
            if not match:
                # The key itself (for unknown keys) is what to point at.
                keys = [k for k, _ in node.value if k.value == key]
                return keys[0].start_mark.line + 1 if keys else line
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            if key >= len(node.value):
                return line
            node = node.value[key]
        else:
            return line
        line = node.start_mark.line + 1
    return line


Overrides = dict[str, Any]
"""Config values from the command line, by dotted key: {"optim.lr": 0.001}."""


def config_keys(model: type[BaseModel] = TrainConfig, prefix: str = "") -> dict[str, str]:
    """Every settable dotted key of the config and its documentation: the train flags."""
    keys: dict[str, str] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            keys |= config_keys(annotation, f"{prefix}{name}.")
        else:
            keys[prefix + name] = field.description or ""
    return keys


def _where(
    path: Path, root: yaml.Node | None, loc: tuple[int | str, ...], overrides: Overrides
) -> str:
    """Where a value came from: its command-line flag, else `file:line`."""
    for size in range(len(loc), 0, -1):
        key = ".".join(str(part) for part in loc[:size])
        if key in overrides:
            return f"--{key}"
    line = _line_of(root, loc)
    return f"{path}:{line}" if line else str(path)


def _message(where: str, field: str, message: str) -> str:
    # A flag already names its field.
    return f"{where}: {message}" if where == f"--{field}" else f"{where}: {field}: {message}"


def _apply(data: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    merged = dict(data)
    for key, value in overrides.items():
        *sections, name = key.split(".")
        target = merged
        for section in sections:
            current = target.get(section)
            target[section] = dict(current) if isinstance(current, dict) else {}
            target = target[section]
        target[name] = value
    return merged


def _format_errors(
    path: Path, root: yaml.Node | None, error: ValidationError, overrides: Overrides
) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        field = ".".join(str(part) for part in loc) or "(top level)"
        where = _where(path, root, loc, overrides)
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key '{field}'")
        elif item["type"] == "missing":
            lines.append(f"{where}: missing required key '{field}'")
        else:
            lines.append(_message(where, field, item["msg"]))
    return "\n".join(lines)


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc


def config_from_dict(
    data: Any, path: Path, root: yaml.Node | None = None, overrides: Overrides | None = None
) -> TrainConfig:
    """Validate `data` (read from `path`) with `overrides` applied.

    Data paths from the file are relative to the file; those from flags are left
    relative to the working directory, where the user typed them.
    """
    overrides = overrides or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        config = TrainConfig.model_validate(_apply(data, overrides))
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, root, exc, overrides)) from None
    updates: dict[str, Any] = {}
    for key in ("train_data", "eval_data"):
        value = getattr(config, key)
        if value is not None and key not in overrides:
            updates[key] = path.parent / value
    config = config.model_copy(update=updates)
    _check_paths(config, path, root, overrides)
    return config


def _check_paths(
    config: TrainConfig, path: Path, root: yaml.Node | None, overrides: Overrides
) -> None:
    """Missing files are config errors naming the key: found before any task trains."""
    problems: list[tuple[str, str]] = []
    for key in ("train_data", "eval_data"):
        value = getattr(config, key)
        if value is not None and not value.is_file():
            problems.append((key, f"no such file: {value}"))
    if config.base_model and not (Path(config.base_model) / "config.json").is_file():
        problems.append(("base_model", f"not a model folder (no config.json): {config.base_model}"))
    if problems:
        lines = []
        for key, message in problems:
            lines.append(_message(_where(path, root, (key,), overrides), key, message))
        raise ConfigError("\n".join(lines))


def load_config(path: Path, overrides: Overrides | None = None) -> TrainConfig:
    """Read one task's train.yaml, with command-line `overrides`."""
    data, root = _read_yaml(path)
    return config_from_dict(data, path, root, overrides)


def load_configs(path: Path, overrides: Overrides | None = None) -> list[TrainConfig]:
    """Read a train.yaml, or a tasks file `{"tasks": [path, ...]}` listing several.

    `overrides` apply to every task.
    """
    data, root = _read_yaml(path)
    if isinstance(data, dict) and set(data) == {"tasks"}:
        tasks = data["tasks"]
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            line = _line_of(root, ("tasks",))
            raise ConfigError(f"{path}:{line}: 'tasks' must be a list of train.yaml paths")
        if not tasks:
            raise ConfigError(f"{path}: 'tasks' lists no task")
        return [load_config(path.parent / task, overrides) for task in tasks]
    return [config_from_dict(data, path, root, overrides)]
