"""Turning task data into LoRA adapters vLLM serves unchanged (and the demo adapters)."""
