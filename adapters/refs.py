"""References to a registry adapter as clients and the CLI write them.

`tenant/name` (the version `@latest` points at), `tenant/name@alias` and
`tenant/name:vN`. The name part follows names.py; an alias follows the same
rule as a name part; a version is `v` and a positive number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraplex.adapters.names import (
    MAX_NAME_LENGTH,
    AdapterName,
    InvalidAdapterName,
    parse_adapter_name,
)

LATEST = "latest"
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"v([1-9][0-9]{0,8})")


@dataclass(frozen=True)
class AdapterRef:
    name: AdapterName
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:v{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return str(self.name)

    @property
    def is_plain(self) -> bool:
        return self.alias is None and self.version is None


def check_alias(alias: str) -> str:
    if not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidAdapterName(
            f"invalid alias {alias!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter"
        )
    return alias


def parse_version(text: str) -> int:
    match = _VERSION.fullmatch(text)
    if not match:
        raise InvalidAdapterName(f"invalid version {text!r}: expected v1, v2, …")
    return int(match.group(1))


def parse_adapter_ref(raw: str) -> AdapterRef:
    """Parse `name`, `name@alias` or `name:vN`, raising InvalidAdapterName with the reason."""
    if len(raw) > MAX_NAME_LENGTH + 66:
        raise InvalidAdapterName("model name is too long")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in raw):
        raise InvalidAdapterName("model name contains control characters")
    if "@" in raw and ":" in raw:
        raise InvalidAdapterName("use either '@alias' or ':vN', not both")
    if "@" in raw:
        base, alias = raw.split("@", 1)
        return AdapterRef(parse_adapter_name(base), alias=check_alias(alias))
    if ":" in raw:
        base, version = raw.split(":", 1)
        return AdapterRef(parse_adapter_name(base), version=parse_version(version))
    return AdapterRef(parse_adapter_name(raw))


def parse_registry_name(raw: str) -> AdapterName:
    """A name the registry can hold: `tenant/name`, the tenant being its owner."""
    name = parse_adapter_name(raw)
    if name.tenant is None:
        raise InvalidAdapterName(
            f"{raw!r} has no tenant: registry adapters are named 'tenant/name'"
        )
    return name
