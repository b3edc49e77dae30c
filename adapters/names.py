"""Adapter names as clients write them, and the rules that keep them safe.

A name is `tenant/name` (or a bare `name`). Each part is 1-64 characters of
letters, digits, `.`, `_` and `-`, starting with a letter or digit, so a name
can never contain a path separator, `..`, a control character or whitespace and
can be used as a relative path under the adapter store without escaping it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_NAME_LENGTH = 129
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class InvalidAdapterName(ValueError):
    """The name cannot name an adapter; the message says why."""


@dataclass(frozen=True)
class AdapterName:
    tenant: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}" if self.tenant else self.name

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.tenant, self.name) if self.tenant else (self.name,)


def parse_adapter_name(raw: str) -> AdapterName:
    """Parse `tenant/name` or `name`, raising InvalidAdapterName with the reason."""
    if not raw:
        raise InvalidAdapterName("model name is empty")
    if len(raw) > MAX_NAME_LENGTH:
        raise InvalidAdapterName(f"model name is longer than {MAX_NAME_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in raw):
        raise InvalidAdapterName("model name contains control characters")
    if "\\" in raw:
        raise InvalidAdapterName("model name contains a backslash")
    if ".." in raw:
        raise InvalidAdapterName("model name contains '..'")
    parts = raw.split("/")
    if len(parts) > 2:
        raise InvalidAdapterName("model name has more than one '/' (expected 'tenant/name')")
    for part in parts:
        if not _PART.fullmatch(part):
            raise InvalidAdapterName(
                f"invalid name part {part!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
    return AdapterName(parts[0], parts[1]) if len(parts) == 2 else AdapterName(None, parts[0])
