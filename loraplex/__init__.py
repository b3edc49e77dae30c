"""loraplex: one base model, many LoRA adapters, one OpenAI-compatible API."""

__version__ = "0.1.0"
