"""loraplex's vLLM plugin (entry point group `vllm.general_plugins`).

vLLM calls `register()` in each of its processes when the plugin is enabled
(`VLLM_PLUGINS=loraplex`, or no VLLM_PLUGINS at all). It registers a LoRA
resolver over loraplex's adapter store, so a stock `vllm serve` with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` serves `"model": "tenant/name"` straight
from the store on first request, with the same name rules as the router.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

RESOLVER_NAME = "loraplex-local-store"


def register() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from loraplex.serving.store_resolver import LocalStoreResolver
    from loraplex.settings import default_cache_dir

    root = Path(os.environ.get("LORAPLEX_ADAPTERS_DIR", default_cache_dir() / "adapters"))
    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, LocalStoreResolver(root))
        log.info("loraplex: LoRA resolver registered for adapter store %s", root)
