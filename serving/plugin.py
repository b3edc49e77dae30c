"""loraplex's vLLM plugin (entry point group `vllm.general_plugins`).

vLLM calls `register()` in each of its processes when the plugin is enabled
(`VLLM_PLUGINS=loraplex`, or no VLLM_PLUGINS at all). It registers a LoRA
resolver over loraplex's adapter store, so a stock `vllm serve` with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` serves `"model": "tenant/name"` straight
from the store on first request, with the same name rules as the router, and a
second resolver for registry version ids (`lpx-<sha256>`, what the router
forwards), fetched and hash-verified into the local registry cache.

On CPU platforms it also swaps vLLM's punica wrapper for loraplex's grouped one
(serving/punica_cpu.py), unless `LORAPLEX_CPU_LORA_KERNELS=vllm`. GPU platforms
keep vLLM's Triton kernels.

Its configuration is ServeSettings, read from the same `LORAPLEX_*` variables as
the router (`loraplex serve` passes them to the engine it starts), so both agree on
the adapter folder, the registry store and its cache.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.lora.resolver import LoRAResolverRegistry
from vllm.platforms import current_platform

from loraplex.adapters.blob_cache import BlobCache
from loraplex.adapters.blob_store import open_blob_store
from loraplex.adapters.registry import RegistryConfig
from loraplex.serving.registry_resolver import RegistryVersionResolver
from loraplex.serving.store_resolver import LocalStoreResolver
from loraplex.settings import ServeSettings

log = logging.getLogger(__name__)

RESOLVER_NAME = "loraplex-local-store"
REGISTRY_RESOLVER_NAME = "loraplex-registry"
WRAPPERS = {
    "loraplex": "loraplex.serving.punica_cpu.FusedPunicaWrapperCPU",
    "loraplex-torch": "loraplex.serving.punica_cpu.GroupedPunicaWrapperCPU",
}


def register() -> None:
    # An invalid LORAPLEX_* value fails here, naming the variable, before vLLM loads a model.
    settings = ServeSettings()
    register_resolvers(settings, LoRAResolverRegistry)
    install_cpu_lora_kernels(settings.cpu_lora_kernels)


def install_cpu_lora_kernels(choice: str) -> None:
    """Make vLLM's CPU platform use loraplex's punica wrapper `choice` (`vllm`: its own)."""
    if choice == "vllm" or not current_platform.is_cpu():
        return
    wrapper = WRAPPERS[choice]
    # The platform method is vLLM's hook for choosing the punica wrapper class;
    # overriding it on the CPU platform class leaves every other platform alone.
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: wrapper)  # type: ignore[method-assign,assignment]
    log.info("loraplex: CPU multi-LoRA kernels enabled (%s)", wrapper)


def registry_cache(settings: ServeSettings) -> BlobCache:
    """The registry's disk cache over its store, where the router's registry has them."""
    config = RegistryConfig.from_settings(settings)
    store = open_blob_store(config.store, config.s3_endpoint_url)
    return BlobCache(config.cache_dir, store, config.cache_bytes)


def register_resolvers(settings: ServeSettings, resolvers: Any) -> None:
    """Register both resolvers with `resolvers` (vLLM's LoRAResolverRegistry), once."""
    if RESOLVER_NAME not in resolvers.get_supported_resolvers():
        resolvers.register_resolver(RESOLVER_NAME, LocalStoreResolver(settings.adapters_dir))
        log.info("loraplex: LoRA resolver registered for adapter store %s", settings.adapters_dir)
    if REGISTRY_RESOLVER_NAME not in resolvers.get_supported_resolvers():
        cache = registry_cache(settings)
        resolvers.register_resolver(REGISTRY_RESOLVER_NAME, RegistryVersionResolver(cache))
        log.info(
            "loraplex: LoRA resolver registered for registry versions from %s (cache %s)",
            cache.store.describe(),
            cache.root,
        )
