"""The vLLM plugin takes its configuration from ServeSettings (LORAPLEX_* variables), like the
router: the adapter folder, the registry store and cache, and the CPU LoRA kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from loraplex.serving import plugin
from loraplex.serving.registry_resolver import RegistryVersionResolver
from loraplex.serving.store_resolver import LocalStoreResolver


class StubResolverRegistry:
    """vLLM's LoRAResolverRegistry as the plugin uses it."""

    def __init__(self) -> None:
        self.resolvers: dict[str, object] = {}

    def get_supported_resolvers(self) -> set[str]:
        return set(self.resolvers)

    def register_resolver(self, name: str, resolver: object) -> None:
        self.resolvers[name] = resolver


@pytest.fixture
def resolvers(monkeypatch: pytest.MonkeyPatch) -> StubResolverRegistry:
    stub = StubResolverRegistry()
    monkeypatch.setattr(plugin, "LoRAResolverRegistry", stub)
    # install_cpu_lora_kernels overrides a method of vLLM's platform class: restore it after.
    platform_class = type(plugin.current_platform)
    monkeypatch.setattr(platform_class, "get_punica_wrapper", platform_class.get_punica_wrapper)
    return stub


def test_register_reads_the_settings_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resolvers: StubResolverRegistry
) -> None:
    monkeypatch.setenv("LORAPLEX_ADAPTERS_DIR", str(tmp_path / "adapters"))
    monkeypatch.setenv("LORAPLEX_REGISTRY_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LORAPLEX_REGISTRY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAPLEX_REGISTRY_CACHE_GIB", "0.5")
    monkeypatch.setenv("LORAPLEX_CPU_LORA_KERNELS", "loraplex-torch")
    plugin.register()

    local = resolvers.resolvers[plugin.RESOLVER_NAME]
    assert isinstance(local, LocalStoreResolver)
    assert local.store.root == (tmp_path / "adapters").resolve()
    registry = resolvers.resolvers[plugin.REGISTRY_RESOLVER_NAME]
    assert isinstance(registry, RegistryVersionResolver)
    assert registry.cache.root == tmp_path / "cache"
    assert registry.cache.store.describe() == str((tmp_path / "store").resolve())
    assert registry.cache.max_bytes == 1 << 29
    if plugin.current_platform.is_cpu():
        assert plugin.current_platform.get_punica_wrapper() == plugin.WRAPPERS["loraplex-torch"]


def test_registry_store_defaults_to_the_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resolvers: StubResolverRegistry
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_REGISTRY_STORE", "")  # a blank variable is the default too
    monkeypatch.setenv("LORAPLEX_CPU_LORA_KERNELS", "vllm")
    plugin.register()
    registry = resolvers.resolvers[plugin.REGISTRY_RESOLVER_NAME]
    assert registry.cache.store.describe() == str(tmp_path / ".cache" / "loraplex" / "registry")


def test_an_unknown_kernel_choice_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, resolvers: StubResolverRegistry
) -> None:
    monkeypatch.setenv("LORAPLEX_CPU_LORA_KERNELS", "fastest")
    with pytest.raises(ValidationError, match="cpu_lora_kernels"):
        plugin.register()
    assert resolvers.resolvers == {}  # nothing half-registered
