"""Write docs/configuration.md: one row per `ServeSettings` field, from the class itself.

The flag is read from the `loraplex serve` parser (so a flag the CLI spells differently,
or a boolean switch, is shown as the CLI takes it), the environment variable from the
settings' prefix, the default from the field, the meaning from the docstring under the
field. tests/unit/test_docs_config_reference.py regenerates the page in memory and fails
when the committed file differs.

    .venv/bin/python scripts/build_config_reference.py
"""

from __future__ import annotations

import argparse
import inspect
import typing
from enum import Enum
from pathlib import Path

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from loraplex.cli import build_parser
from loraplex.settings import ServeSettings

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "configuration.md"
COMMAND = ".venv/bin/python scripts/build_config_reference.py"

HEADER = f"""# Configuration reference

Every setting of `loraplex serve`: its flag, its environment variable, its default and
what it does. Flags win over environment variables, environment variables over the
defaults. Other commands take the flags of the settings they use (`loraplex adapters
publish --help`, `loraplex tenants create --help`, ...), with the same environment
variables. Inside vLLM, loraplex's plugin reads the same `LORAPLEX_*` variables (see
[serving.md](serving.md#the-vllm-plugin)).

<!-- Generated from loraplex/settings.py (ServeSettings) by scripts/build_config_reference.py.
Do not edit by hand: change the field's docstring, then run `{COMMAND}`.
tests/unit/test_docs_config_reference.py fails while this file is stale. -->

| flag | environment variable | default | meaning |
|---|---|---|---|
"""


def serve_flags() -> dict[str, list[str]]:
    """Settings field name → the option strings `loraplex serve` accepts for it."""
    serve = subcommand_parser(build_parser(), ["serve"])
    return {action.dest: list(action.option_strings) for action in serve._actions}


def subcommand_parser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        parser = subcommands(parser)[word]
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name; empty when it has none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render_default(value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, Enum):
        value = value.value
    if value == "" or value is None:
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    # A default under whoever runs the generator (a path, a sqlite:/// URL): show it under
    # every reader's own home.
    text = str(value).replace(str(Path.home()) + "/", "~/")
    return f"`{text}`"


def render_meaning(field: FieldInfo) -> str:
    text = " ".join(inspect.cleandoc(field.description or "").split())
    choices = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is typing.Literal:
        text += " One of " + ", ".join(f"`{c}`" for c in choices) + "."
    return text


def cell(text: str) -> str:
    """Markdown table cell: `|` escaped; outside code spans `<...>` shown, not taken as HTML."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def render() -> str:
    flags = serve_flags()
    prefix = ServeSettings.model_config.get("env_prefix", "")
    rows = []
    for name, field in ServeSettings.model_fields.items():
        options = flags.get(name)
        flag = ", ".join(f"`{option}`" for option in options) if options else "(none)"
        env = f"`{prefix}{name.upper()}`"
        default = render_default(field.get_default(call_default_factory=True))
        rows.append(f"| {flag} | {env} | {default} | {cell(render_meaning(field))} |\n")
    return HEADER + "".join(rows)


def main() -> None:
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(render())
    print(OUTPUT.relative_to(REPO))


if __name__ == "__main__":
    main()
