"""A vLLM LoRAResolver for registry versions: `lpx-<sha256>` → a verified local folder.

vLLM asks its resolvers when a request names an adapter it has not loaded. This
one answers only for version ids, fetching the blob from the registry store
into the local disk cache (hash-verified, LRU-bounded) when it is not there, so
a stock `vllm serve` with the loraplex plugin serves any published version on
first request. It never reads the catalog: the id already names the content.
"""

from __future__ import annotations

import asyncio
import logging
import zlib

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from loraplex.adapters.blob_cache import BlobCache
from loraplex.adapters.blob_store import BlobMissing, StoreUnavailable
from loraplex.adapters.content import BlobCorrupt, digest_of_version_id

log = logging.getLogger(__name__)


class RegistryVersionResolver(LoRAResolver):
    def __init__(self, cache: BlobCache) -> None:
        self.cache = cache

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        digest = digest_of_version_id(lora_name)
        if digest is None:
            return None  # not a registry version: another resolver may know it
        try:
            path = await asyncio.to_thread(self.cache.ensure, digest)
        except BlobMissing:
            return None
        except (BlobCorrupt, StoreUnavailable) as exc:
            # vLLM turns None into a 404; the reason belongs in the log.
            log.error("loraplex: cannot fetch registry version %s: %s", lora_name, exc)
            return None
        # vLLM overwrites the id with its own counter; any positive int is fine here.
        return LoRARequest(
            lora_name=lora_name, lora_int_id=zlib.crc32(digest.encode()) or 1, lora_path=str(path)
        )
