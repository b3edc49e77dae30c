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
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

RESOLVER_NAME = "loraplex-local-store"
REGISTRY_RESOLVER_NAME = "loraplex-registry"
CPU_KERNELS_ENV = "LORAPLEX_CPU_LORA_KERNELS"
WRAPPERS = {
    "loraplex": "loraplex.serving.punica_cpu.FusedPunicaWrapperCPU",
    "loraplex-torch": "loraplex.serving.punica_cpu.GroupedPunicaWrapperCPU",
}


def register() -> None:
    _register_resolver()
    _install_cpu_lora_kernels()


def _install_cpu_lora_kernels() -> None:
    choice = os.environ.get(CPU_KERNELS_ENV, "loraplex").strip().lower()
    if choice not in (*WRAPPERS, "vllm"):
        raise ValueError(
            f"{CPU_KERNELS_ENV} must be one of {', '.join((*WRAPPERS, 'vllm'))}, got {choice!r}"
        )
    from vllm.platforms import current_platform

    if choice == "vllm" or not current_platform.is_cpu():
        return
    wrapper = WRAPPERS[choice]
    # The platform method is vLLM's hook for choosing the punica wrapper class;
    # overriding it on the CPU platform class leaves every other platform alone.
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: wrapper)  # type: ignore[method-assign,assignment]
    log.info("loraplex: CPU multi-LoRA kernels enabled (%s)", wrapper)


def _register_resolver() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from loraplex.serving.registry_resolver import RegistryVersionResolver
    from loraplex.serving.store_resolver import LocalStoreResolver
    from loraplex.settings import default_cache_dir

    root = Path(os.environ.get("LORAPLEX_ADAPTERS_DIR", default_cache_dir() / "adapters"))
    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, LocalStoreResolver(root))
        log.info("loraplex: LoRA resolver registered for adapter store %s", root)
    if REGISTRY_RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        cache = _registry_cache()
        LoRAResolverRegistry.register_resolver(
            REGISTRY_RESOLVER_NAME, RegistryVersionResolver(cache)
        )
        log.info(
            "loraplex: LoRA resolver registered for registry versions from %s (cache %s)",
            cache.store.describe(),
            cache.root,
        )


def _registry_cache():  # type: ignore[no-untyped-def]
    """The registry's disk cache and store, from the same LORAPLEX_REGISTRY_* settings as
    the router (loraplex serve passes them to the backend)."""
    from loraplex.adapters.blob_cache import BlobCache
    from loraplex.adapters.blob_store import open_blob_store
    from loraplex.adapters.registry import GIB
    from loraplex.settings import ServeSettings, default_cache_dir

    settings = ServeSettings()
    store = open_blob_store(
        settings.registry_store or default_cache_dir() / "registry",
        settings.registry_s3_endpoint_url or None,
    )
    return BlobCache(settings.registry_cache_dir, store, int(settings.registry_cache_gib * GIB))
