"""A bounded local disk cache of verified adapter versions, with LRU eviction.

`ensure(digest)` returns a folder vLLM can load (`<cache>/<digest>/`), downloading
and verifying the blob first when it is not there. A folder only ever appears
complete and verified: downloads go to a staging folder that is renamed into place.
The router and the vLLM plugin may share one cache from two processes, so
downloads of one digest are serialized by a file lock; recency is the folder's
mtime, refreshed on every hit. Eviction removes least recently used folders
until the cache fits its byte budget, never the one just asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from loraplex.adapters.blob_store import BlobStore
from loraplex.adapters.content import INDEX_FILE, is_digest, parse_index, verify_dir

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class BlobCache:
    def __init__(self, root: Path, store: BlobStore, max_bytes: int) -> None:
        self.root = Path(root).expanduser().resolve()
        self.store = store
        self.max_bytes = max_bytes

    def path(self, digest: str) -> Path:
        if not is_digest(digest):  # the digest becomes a folder name
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest

    def contains(self, digest: str) -> bool:
        return (self.path(digest) / INDEX_FILE).is_file()

    def ensure(self, digest: str) -> Path:
        """The verified folder of `digest`, downloaded if needed.

        Raises BlobMissing, StoreUnavailable (from the store) or BlobCorrupt.
        """
        target = self.path(digest)
        if self._touch(target):
            return target
        with _file_lock(self.root / ".locks" / f"{digest}.lock"):
            if self._touch(target):  # another process downloaded it meanwhile
                return target
            started = time.monotonic()
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
            try:
                self.store.fetch(digest, staging)
                content = parse_index((staging / INDEX_FILE).read_bytes(), digest)
                verify_dir(staging, content, digest)
                os.rename(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log.info(
                "adapter blob downloaded and verified",
                extra={
                    "digest": digest,
                    "bytes": content.size,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
        self.evict(keep={digest})
        return target

    def touch(self, digest: str) -> bool:
        """Mark `digest` as just used; False when it is not (or no longer) cached."""
        return self._touch(self.path(digest))

    def _touch(self, target: Path) -> bool:
        if not (target / INDEX_FILE).is_file():
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(target)  # recency for LRU eviction
            return True
        return False

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every cached version, least recently used first."""
        found = []
        if not self.root.is_dir():
            return found
        for folder in self.root.iterdir():
            if folder.is_dir() and is_digest(folder.name) and (folder / INDEX_FILE).is_file():
                with contextlib.suppress(FileNotFoundError):
                    found.append((folder.stat().st_mtime, _folder_size(folder), folder))
        return sorted(found)

    def evict(self, keep: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        """Remove least recently used versions until the cache fits; returns their digests."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        evicted: list[str] = []
        for _, size, folder in entries:
            if total <= self.max_bytes:
                break
            if folder.name in keep:
                continue
            trash = self.root / f".evicted-{uuid.uuid4().hex}"
            try:
                os.rename(folder, trash)  # gone for readers at once, deleted after
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            evicted.append(folder.name)
            log.info("adapter evicted from the disk cache", extra={"digest": folder.name})
        return evicted
