"""The local adapter folder: `<root>/<tenant>/<name>/` or `<root>/<name>/`, peft format.

Every lookup goes through `parse_adapter_name`, and the resolved path is checked
to lie inside the root, so a request can never make the server read elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.names import AdapterName, InvalidAdapterName, parse_adapter_name

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class LocalAdapter:
    name: AdapterName
    path: Path
    created: int

    @property
    def id(self) -> str:
        return str(self.name)


def _is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


class LocalAdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def get(self, raw_name: str) -> LocalAdapter | None:
        """The adapter called `raw_name`, or None. Raises InvalidAdapterName for unsafe names."""
        name = parse_adapter_name(raw_name)
        path = self.root.joinpath(*name.parts).resolve()
        if not path.is_relative_to(self.root):  # symlinks pointing outside the store
            raise InvalidAdapterName("model name resolves outside the adapter store")
        if not _is_adapter_dir(path):
            return None
        return LocalAdapter(name, path, int((path / ADAPTER_CONFIG).stat().st_mtime))

    def list(self) -> list[LocalAdapter]:
        """Every servable adapter, sorted by name. Folders with unsafe names are skipped."""
        if not self.root.is_dir():
            return []
        found: list[LocalAdapter] = []
        for config in sorted(self.root.glob(f"*/{ADAPTER_CONFIG}")) + sorted(
            self.root.glob(f"*/*/{ADAPTER_CONFIG}")
        ):
            relative = config.parent.relative_to(self.root).as_posix()
            try:
                adapter = self.get(relative)
            except InvalidAdapterName:
                continue
            if adapter is not None:
                found.append(adapter)
        return sorted(found, key=lambda a: a.id)
