"""Content addressing of an adapter version: which files it is made of, and their hash.

A version is identified by the sha256 of its index, a canonical JSON listing
every file's name, size and sha256. The same files always give the same id, a
changed byte gives another one, and a download is checked file by file against
the index before it is used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.local_store import ADAPTER_CONFIG, WEIGHT_FILES
from loraplex.adapters.manifest import MANIFEST_FILE, sha256_bytes, sha256_file

INDEX_FILE = "index.json"
# Only what vLLM reads and the manifest travel with a version: stray files (checkpoints,
# optimizer states, plots) would bloat every download without changing the adapter.
VERSION_FILES = (ADAPTER_CONFIG, *WEIGHT_FILES, MANIFEST_FILE)
VERSION_ID_PREFIX = "lpx-"
_DIGEST = re.compile(r"[0-9a-f]{64}")


class BlobCorrupt(ValueError):
    """Stored bytes do not match the hash they were published under."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class VersionContent:
    files: tuple[FileEntry, ...]

    @property
    def index_bytes(self) -> bytes:
        listing = {f.name: {"sha256": f.sha256, "size": f.size} for f in self.files}
        return json.dumps({"files": listing}, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return sha256_bytes(self.index_bytes)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def version_id(digest: str) -> str:
    """The immutable name a version has in the backend (vLLM's `model` field)."""
    return VERSION_ID_PREFIX + digest


def digest_of_version_id(name: str) -> str | None:
    """The content hash inside a version id, or None when `name` is not one."""
    if name.startswith(VERSION_ID_PREFIX) and _DIGEST.fullmatch(name[len(VERSION_ID_PREFIX) :]):
        return name[len(VERSION_ID_PREFIX) :]
    return None


def is_digest(value: str) -> bool:
    return bool(_DIGEST.fullmatch(value))


def scan_adapter_dir(path: Path) -> VersionContent:
    """The version files present in `path`, hashed (no checks on what they contain)."""
    entries = [
        FileEntry(name, (path / name).stat().st_size, sha256_file(path / name))
        for name in VERSION_FILES
        if (path / name).is_file()
    ]
    return VersionContent(tuple(entries))


def parse_index(data: bytes, digest: str) -> VersionContent:
    """The file listing stored under `digest`, after checking the listing itself is intact."""
    actual = sha256_bytes(data)
    if actual != digest:
        raise BlobCorrupt(f"index of blob {digest[:12]} hashes to {actual[:12]}")
    try:
        listing = json.loads(data)["files"]
        files = tuple(
            FileEntry(name, int(meta["size"]), str(meta["sha256"]))
            for name, meta in sorted(listing.items())
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BlobCorrupt(f"index of blob {digest[:12]} is unreadable: {exc}") from None
    for entry in files:
        # The index names files written into the cache: never a path.
        if entry.name not in VERSION_FILES:
            raise BlobCorrupt(f"index of blob {digest[:12]} lists unexpected file {entry.name!r}")
    return VersionContent(files)


def verify_dir(path: Path, content: VersionContent, digest: str) -> None:
    """Raise BlobCorrupt unless every file of `content` is in `path` with its recorded hash."""
    for entry in content.files:
        file = path / entry.name
        if not file.is_file():
            raise BlobCorrupt(f"blob {digest[:12]}: file {entry.name} is missing")
        actual = sha256_file(file)
        if actual != entry.sha256:
            raise BlobCorrupt(
                f"blob {digest[:12]}: {entry.name} hashes to {actual[:12]}, "
                f"expected {entry.sha256[:12]} (the store is corrupted; republish the adapter)"
            )
