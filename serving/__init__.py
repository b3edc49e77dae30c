"""Everything that runs inside or launches vLLM: base model, backend launcher, plugin."""
