"""Where published adapter files live: a local folder or an S3-compatible bucket.

Layout (both kinds): `<root>/blobs/<digest>/<file>` plus `<root>/blobs/<digest>/index.json`.
A blob becomes visible only when complete: the local store writes into a staging
folder and renames it into place; the S3 store uploads the files first and the
index last, and readers require the index. Stores move bytes only; checking
them against the digest is the cache's job (blob_cache.py), done on every download,
and publish's (`stored_blob_problem`), which replaces a stored blob that fails it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

from loraplex.adapters.content import (
    INDEX_FILE,
    BlobCorrupt,
    VersionContent,
    parse_index,
    verify_dir,
)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class StoreUnavailable(RuntimeError):
    """The store cannot be reached (network, credentials, missing bucket)."""


class BlobMissing(LookupError):
    """No complete blob with this digest is in the store."""


class BlobStore(Protocol):
    def describe(self) -> str: ...

    def has(self, digest: str) -> bool: ...

    def put(
        self,
        digest: str,
        content: VersionContent,
        source: Path,
        progress: Progress | None = None,
        replace: bool = False,
    ) -> None:
        """Store `source`'s files as blob `digest`; kept as is when present unless `replace`."""
        ...

    def fetch(self, digest: str, target: Path) -> None:
        """Write the blob's index and files into the existing folder `target` (unverified)."""
        ...

    def delete(self, digest: str) -> None: ...


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def describe(self) -> str:
        return str(self.root)

    def _blob(self, digest: str) -> Path:
        return self.root / "blobs" / digest

    def has(self, digest: str) -> bool:
        return (self._blob(digest) / INDEX_FILE).is_file()

    def put(
        self,
        digest: str,
        content: VersionContent,
        source: Path,
        progress: Progress | None = None,
        replace: bool = False,
    ) -> None:
        if self.has(digest) and not replace:
            return
        staging_root = self.root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=staging_root))
        try:
            for entry in content.files:
                if progress:
                    progress(f"copying {entry.name} ({entry.size / 1e6:.1f} MB)")
                shutil.copyfile(source / entry.name, staging / entry.name)
            (staging / INDEX_FILE).write_bytes(content.index_bytes)
            self._blob(digest).parent.mkdir(parents=True, exist_ok=True)
            if replace:
                # The bad blob leaves by rename, and the new one arrives by rename: a
                # reader misses it for a moment, never sees a mix of the two.
                self.delete(digest)
            try:
                os.rename(staging, self._blob(digest))  # atomic: all files or none
            except OSError:
                if not self.has(digest):  # not a concurrent publish of the same bytes
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def fetch(self, digest: str, target: Path) -> None:
        blob = self._blob(digest)
        if not self.has(digest):
            raise BlobMissing(f"blob {digest[:12]} is not in the store {self.root}")
        for file in blob.iterdir():
            if file.is_file():
                _link_or_copy(file, target / file.name)

    def delete(self, digest: str) -> None:
        blob = self._blob(digest)
        if blob.is_dir():
            # Rename first so a reader never sees a half-deleted blob as complete.
            trash = blob.with_name(f".deleted-{digest}-{uuid.uuid4().hex}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(blob, trash)
                shutil.rmtree(trash, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a blob file into the cache (blobs are immutable), copy across filesystems.

    A cold adapter load spends its time reading: linking saves one full copy of the
    weights (~10 ms for an r=16 adapter of the embedded base); the cache still verifies
    every file's hash, so a corrupted store file is caught either way.
    """
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


class S3BlobStore:
    """Any S3-compatible bucket (AWS, MinIO, Ceph, moto) through boto3."""

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"registry store URL {url!r} is not of the form s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint_url = endpoint_url or None
        # Imported here: boto3 costs ~0.3 s (measured with -X importtime, more on a busy
        # machine) that a folder store, the default, never needs.
        import boto3
        from botocore.config import Config

        # Fail fast when the store is down: a cold adapter answers 503 in seconds,
        # not after boto3's default minute of retries.
        config = Config(
            connect_timeout=3, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}
        )
        self._s3 = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _key(self, digest: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, "blobs", digest, name) if p)

    def _folder(self, digest: str) -> str:
        return self._key(digest, INDEX_FILE)[: -len(INDEX_FILE)]

    def _call(self, fn: Callable, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise BlobMissing(str(exc)) from None
            raise StoreUnavailable(f"{self.describe()}: {code or exc}") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"{self.describe()} unreachable: {exc}") from None

    def has(self, digest: str) -> bool:
        try:
            self._call(self._s3.head_object, Bucket=self.bucket, Key=self._key(digest, INDEX_FILE))
        except BlobMissing:
            return False
        return True

    def put(
        self,
        digest: str,
        content: VersionContent,
        source: Path,
        progress: Progress | None = None,
        replace: bool = False,
    ) -> None:
        if self.has(digest) and not replace:
            return
        # Replacing overwrites the files in place, the index (same bytes) last; a reader
        # meanwhile may fetch a mix, which the cache's verification refuses (a retry gets
        # the repaired blob).
        for entry in content.files:
            if progress:
                progress(f"uploading {entry.name} ({entry.size / 1e6:.1f} MB)")
            self._call(
                self._s3.upload_file,
                str(source / entry.name),
                self.bucket,
                self._key(digest, entry.name),
            )
        # The index goes last: until it exists the blob does not exist for readers.
        self._call(
            self._s3.put_object,
            Bucket=self.bucket,
            Key=self._key(digest, INDEX_FILE),
            Body=content.index_bytes,
        )

    def fetch(self, digest: str, target: Path) -> None:
        index = self._call(
            self._s3.get_object, Bucket=self.bucket, Key=self._key(digest, INDEX_FILE)
        )["Body"].read()
        (target / INDEX_FILE).write_bytes(index)
        # The index is verified before its names are used as file names.
        for entry in parse_index(index, digest).files:
            self._call(
                self._s3.download_file,
                self.bucket,
                self._key(digest, entry.name),
                str(target / entry.name),
            )

    def delete(self, digest: str) -> None:
        # Index first: the blob disappears for readers before its files do.
        names = [INDEX_FILE]
        with contextlib.suppress(BlobMissing):
            listing = self._call(
                self._s3.list_objects_v2, Bucket=self.bucket, Prefix=self._folder(digest)
            )
            names += [obj["Key"].rsplit("/", 1)[-1] for obj in listing.get("Contents", [])]
        for name in dict.fromkeys(names):
            with contextlib.suppress(BlobMissing):
                self._call(self._s3.delete_object, Bucket=self.bucket, Key=self._key(digest, name))


def stored_blob_problem(store: BlobStore, digest: str) -> str | None:
    """Why the stored blob `digest` is not intact (None when it is): its files are fetched
    and hashed as the cache would. A publish that finds the blob already stored checks
    it, so republishing repairs a corrupted store instead of reusing the bad bytes."""
    scratch = Path(tempfile.mkdtemp(prefix="loraplex-verify-"))
    try:
        store.fetch(digest, scratch)
        verify_dir(scratch, parse_index((scratch / INDEX_FILE).read_bytes(), digest), digest)
    except (BlobCorrupt, BlobMissing) as exc:
        return str(exc)
    except FileNotFoundError as exc:  # a file the index lists is gone from a folder store
        return f"blob {digest[:12]}: {exc}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return None


def open_blob_store(url: str | Path, endpoint_url: str | None = None) -> BlobStore:
    """A store for a folder path or an `s3://bucket/prefix` URL."""
    text = str(url)
    if text.startswith("s3://"):
        return S3BlobStore(text, endpoint_url)
    return LocalBlobStore(Path(text))
