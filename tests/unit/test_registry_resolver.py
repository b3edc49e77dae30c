"""The vLLM plugin's resolver for registry version ids, without an engine."""

from __future__ import annotations

import asyncio
import logging

from loraplex.adapters.blob_cache import BlobCache
from loraplex.adapters.blob_store import LocalBlobStore
from loraplex.adapters.content import scan_adapter_dir, version_id
from loraplex.serving.registry_resolver import RegistryVersionResolver
from tests.unit.registry_helpers import make_adapter_dir


def test_version_ids_resolve_to_verified_cache_folders(tmp_path, caplog):
    store = LocalBlobStore(tmp_path / "store")
    resolver = RegistryVersionResolver(BlobCache(tmp_path / "cache", store, 1 << 30))
    good = make_adapter_dir(tmp_path / "good", seed=1)
    bad = make_adapter_dir(tmp_path / "bad", seed=2)
    for source in (good, bad):
        content = scan_adapter_dir(source)
        store.put(content.digest, content, source)
    good_digest, bad_digest = scan_adapter_dir(good).digest, scan_adapter_dir(bad).digest
    weights = store.root / "blobs" / bad_digest / "adapter_model.safetensors"
    weights.write_bytes(b"x" + weights.read_bytes()[1:])

    def resolve(name: str):  # type: ignore[no-untyped-def]
        return asyncio.run(resolver.resolve_lora("base", name))

    request = resolve(version_id(good_digest))
    assert request.lora_name == version_id(good_digest)
    assert request.lora_path == str(tmp_path / "cache" / good_digest)
    assert (tmp_path / "cache" / good_digest / "adapter_model.safetensors").read_bytes() == (
        good / "adapter_model.safetensors"
    ).read_bytes()
    assert resolve("acme/bot") is None  # not a version id: left to other resolvers
    assert resolve("lpx-" + "0" * 64) is None  # unknown version
    with caplog.at_level(logging.ERROR):
        assert resolve(version_id(bad_digest)) is None
    assert any("cannot fetch registry version" in r.getMessage() for r in caplog.records)
