"""A tiny Llama with SmolLM2's tokenizer: 2 layers of width 16, so a training run takes seconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loraplex.base_model import embedded_model_dir

TASK = Path(__file__).resolve().parents[2] / "examples" / "tasks" / "ticket-routing"


def build_tiny_llama(folder: Path) -> Path:
    """Write the tiny model (seeded, so always the same weights) into `folder`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(folder)
    return folder
