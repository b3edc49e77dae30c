"""Deterministic demo adapters: seeded random LoRA weights on the real base model.

They exist so `loraplex serve` and the tests have real peft adapters to serve
before any training has run. The weights are random but seeded, so the same
seed always gives byte-identical files, and scaled so that each adapter changes
the base model's answers decisively (no near-ties that bf16 rounding could flip).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraplex.training.config import LLAMA_PROJECTIONS

log = logging.getLogger(__name__)

DEMO_MARKER = "loraplex-demo.json"


@dataclass(frozen=True)
class DemoAdapterSpec:
    name: str
    rank: int
    seed: int
    strength: float
    """Standard deviation of the update B·A relative to the base layer's input scale."""


DEMO_ADAPTERS = (
    DemoAdapterSpec("demo/alpha", rank=8, seed=1, strength=0.4),
    DemoAdapterSpec("demo/beta", rank=16, seed=2, strength=0.4),
)


def build_demo_adapter(base_model_dir: Path, spec: DemoAdapterSpec, out_dir: Path) -> Path:
    """Write one seeded adapter in standard peft format into `out_dir`."""
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.rank,  # scaling 1: the weights alone set the strength
        target_modules=list(LLAMA_PROJECTIONS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            elif "lora_B" in name:
                param.copy_(
                    torch.randn(param.shape, generator=generator) * spec.strength / (spec.rank**0.5)
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    # peft records the absolute base path; a relative-free id keeps the folder portable.
    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_model_dir.name
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    (out_dir / DEMO_MARKER).write_text(json.dumps(dataclasses.asdict(spec)))
    return out_dir


def ensure_demo_adapters(
    base_model_dir: Path,
    adapters_dir: Path,
    specs: tuple[DemoAdapterSpec, ...] | list[DemoAdapterSpec] = DEMO_ADAPTERS,
) -> list[Path]:
    """Build any missing adapter of `specs` under `adapters_dir`; existing ones are kept."""
    paths = []
    for spec in specs:
        target = adapters_dir.joinpath(*spec.name.split("/"))
        marker = target / DEMO_MARKER
        if marker.is_file() and json.loads(marker.read_text()) == dataclasses.asdict(spec):
            paths.append(target)
            continue
        log.info("building demo adapter %s (r=%d) in %s", spec.name, spec.rank, target)
        paths.append(build_demo_adapter(base_model_dir, spec, target))
    return paths
