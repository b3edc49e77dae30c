"""A vLLM LoRAResolver that finds adapters in loraplex's local adapter store."""

from __future__ import annotations

import zlib
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from loraplex.adapters.local_store import LocalAdapterStore
from loraplex.adapters.names import InvalidAdapterName


class LocalStoreResolver(LoRAResolver):
    def __init__(self, root: Path) -> None:
        self.store = LocalAdapterStore(root)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            adapter = self.store.get(lora_name)
        except InvalidAdapterName:
            return None  # never touch the filesystem for an unsafe name
        if adapter is None:
            return None
        # vLLM overwrites the id with its own counter; any positive int is fine here.
        return LoRARequest(
            lora_name=lora_name,
            lora_int_id=zlib.crc32(lora_name.encode()) or 1,
            lora_path=str(adapter.path),
        )
