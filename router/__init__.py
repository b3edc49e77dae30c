"""The OpenAI-compatible front door: resolves `model` to an adapter and proxies to vLLM."""
