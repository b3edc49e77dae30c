"""Blob stores (a folder, and a real S3-compatible server: moto on loopback) and the
verified LRU disk cache: publish, resolve, download, verify, corrupt-and-detect, unreachable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from loraplex.adapters.blob_cache import BlobCache
from loraplex.adapters.blob_store import (
    BlobMissing,
    LocalBlobStore,
    S3BlobStore,
    StoreUnavailable,
    open_blob_store,
)
from loraplex.adapters.catalog import Catalog
from loraplex.adapters.content import INDEX_FILE, BlobCorrupt, scan_adapter_dir
from loraplex.adapters.publish import PublishChecks, publish_adapter
from loraplex.adapters.refs import parse_adapter_ref, parse_registry_name
from loraplex.database import sqlite_url
from tests.unit.registry_helpers import free_port, make_adapter_dir, moto_s3

CHECKS = PublishChecks(max_lora_rank=16, max_bytes=1 << 30)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(key, value)
        with moto_s3() as endpoint:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="adapters")
            yield endpoint


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return open_blob_store(f"s3://adapters/{tmp_path.name}", endpoint)


def test_publish_resolve_download_verify(store, tmp_path):
    catalog = Catalog.open(sqlite_url(tmp_path / "db.sqlite"))
    source = make_adapter_dir(tmp_path / "src", seed=1)
    record, created = publish_adapter(
        source, parse_registry_name("acme/bot"), catalog=catalog, store=store, checks=CHECKS
    )
    assert created and record.ref == "acme/bot:v1"
    assert record.digest == scan_adapter_dir(source).digest
    resolved = catalog.resolve(parse_adapter_ref("acme/bot"))
    cache = BlobCache(tmp_path / "cache", store, max_bytes=1 << 30)
    folder = cache.ensure(resolved.digest)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    assert cache.ensure(resolved.digest) == folder  # a hit does not download again


def test_corrupted_blob_is_detected_and_never_cached(store, tmp_path):
    source = make_adapter_dir(tmp_path / "src", seed=2)
    content = scan_adapter_dir(source)
    store.put(content.digest, content, source)
    _corrupt(store, content.digest, "adapter_model.safetensors")
    cache = BlobCache(tmp_path / "cache", store, max_bytes=1 << 30)
    with pytest.raises(BlobCorrupt, match=r"adapter_model\.safetensors hashes to"):
        cache.ensure(content.digest)
    assert not cache.contains(content.digest)
    assert not any(p.name.startswith(".staging") for p in cache.root.iterdir())


def _corrupt(store, digest: str, name: str) -> None:
    if isinstance(store, LocalBlobStore):
        path = store.root / "blobs" / digest / name
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        key = store._key(digest, name)
        client = boto3.client("s3", endpoint_url=store.endpoint_url)
        body = bytearray(client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
        body[-1] ^= 0xFF
        client.put_object(Bucket=store.bucket, Key=key, Body=bytes(body))


def test_a_blob_without_its_index_does_not_exist(store, tmp_path):
    """An upload cut off before the index (written last) stays invisible."""
    source = make_adapter_dir(tmp_path / "src", seed=3)
    content = scan_adapter_dir(source)
    store.put(content.digest, content, source)
    if isinstance(store, LocalBlobStore):
        (store.root / "blobs" / content.digest / INDEX_FILE).unlink()
    else:
        client = boto3.client("s3", endpoint_url=store.endpoint_url)
        client.delete_object(Bucket=store.bucket, Key=store._key(content.digest, INDEX_FILE))
    assert not store.has(content.digest)
    cache = BlobCache(tmp_path / "cache", store, max_bytes=1 << 30)
    with pytest.raises(BlobMissing):
        cache.ensure(content.digest)


def test_delete_removes_the_blob(store, tmp_path):
    source = make_adapter_dir(tmp_path / "src", seed=4)
    content = scan_adapter_dir(source)
    store.put(content.digest, content, source)
    assert store.has(content.digest)
    store.delete(content.digest)
    assert not store.has(content.digest)


def test_unreachable_s3_fails_fast_and_cached_versions_keep_working(tmp_path, s3_endpoint):
    source = make_adapter_dir(tmp_path / "src", seed=5)
    content = scan_adapter_dir(source)
    good = S3BlobStore(f"s3://adapters/{tmp_path.name}", s3_endpoint)
    good.put(content.digest, content, source)
    cache = BlobCache(tmp_path / "cache", good, max_bytes=1 << 30)
    cached = cache.ensure(content.digest)

    down = BlobCache(
        tmp_path / "cache", S3BlobStore("s3://adapters/x", _closed_endpoint()), 1 << 30
    )
    assert down.ensure(content.digest) == cached  # no store call for a cached version
    cold = make_adapter_dir(tmp_path / "cold", seed=6)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        down.ensure(scan_adapter_dir(cold).digest)
    assert time.monotonic() - started < 30


def _closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_cache_evicts_least_recently_used_beyond_its_budget(tmp_path):
    store = LocalBlobStore(tmp_path / "store")
    digests = []
    for seed in range(4):
        source = make_adapter_dir(tmp_path / f"src{seed}", seed=seed)
        content = scan_adapter_dir(source)
        store.put(content.digest, content, source)
        digests.append(content.digest)
    size = scan_adapter_dir(tmp_path / "src0").size
    cache = BlobCache(tmp_path / "cache", store, max_bytes=int(size * 2.5))  # room for two
    for digest in digests[:2]:
        cache.ensure(digest)
        time.sleep(0.01)  # distinct mtimes
    cache.ensure(digests[0])  # a hit makes it the most recently used
    time.sleep(0.01)
    cache.ensure(digests[2])
    assert [cache.contains(d) for d in digests] == [True, False, True, False]
    assert cache.ensure(digests[1]).is_dir()  # evicted ones come back on demand
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes


def test_cache_refuses_non_digest_names(tmp_path):
    cache = BlobCache(tmp_path / "cache", LocalBlobStore(tmp_path / "store"), 1 << 30)
    with pytest.raises(ValueError, match="not a sha256"):
        cache.ensure("../../etc")


def test_local_store_has_no_partial_blob_after_a_failed_copy(tmp_path, monkeypatch):
    source = make_adapter_dir(tmp_path / "src", seed=7)
    content = scan_adapter_dir(source)
    store = LocalBlobStore(tmp_path / "store")
    import shutil

    calls = {"n": 0}
    real_copy = shutil.copyfile

    def failing_copy(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        store.put(content.digest, content, source)
    assert not store.has(content.digest)
    assert not (Path(store.root) / "blobs" / content.digest).exists()
