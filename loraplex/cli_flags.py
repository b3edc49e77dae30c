"""Command-line flags generated from ServeSettings, for every `loraplex` command.

One flag per field (`registry_cache_dir` → `--registry-cache-dir`), its help the
field's docstring with its `LORAPLEX_*` variable and default, its type and
choices from the annotation; a boolean is a switch (`--allow-open-access`, and
`--no-allow-open-access` to turn it off over the variable). A flag left out is
None in the namespace, so the settings class alone fills it from the
environment or its default. Secrets (SecretStr fields: the admin key, the engine
key) get no flag: a command line is visible to every user of the host (`ps`), so
they come from the environment or a file only.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr, ValidationError

from loraplex.settings import ServeSettings

ENV_PREFIX = ServeSettings.model_config.get("env_prefix", "")


def env_var(field: str) -> str:
    """The environment variable of a settings field."""
    return f"{ENV_PREFIX}{field.upper()}"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def shown_default(value: object) -> str:
    """A default as a user would write it: `false`, `''`, `~/.cache/loraplex/adapters`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, SecretStr):
        return "''" if not value.get_secret_value() else "(set)"
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith("/")):
        home = str(Path.home())
        text = str(value)
        return "~" + text[len(home) :] if text.startswith(home + "/") else text
    if value == "":
        return "''"
    if value is None:
        return "unset"
    return str(value)


def is_secret(field: str) -> bool:
    """Whether a settings field holds a secret, which never gets a flag."""
    return ServeSettings.model_fields[field].annotation is SecretStr


class _RefuseSecretFlag(argparse.Action):
    """Ends the command (exit 2) naming where the secret goes instead; never echoes it."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        name = self.dest.removeprefix("_secret_flag_")
        where = f"{env_var(name)} or {env_var(name)}_FILE" if name == "admin_key" else env_var(name)
        parser.error(f"{option_string} is not accepted (a command line shows in `ps`): set {where}")


def add_settings_flags(
    parser: argparse.ArgumentParser, fields: Iterable[str] | None = None
) -> None:
    """Add one flag per ServeSettings field (all of them, or those named in `fields`),
    secrets excepted."""
    for name in fields if fields is not None else ServeSettings.model_fields:
        if is_secret(name):
            # A hidden flag that refuses, rather than none: argparse would otherwise take
            # `--admin-key VALUE` as an abbreviation of `--admin-key-file`.
            parser.add_argument(
                flag_name(name),
                dest=f"_secret_flag_{name}",
                nargs="?",
                action=_RefuseSecretFlag,
                help=argparse.SUPPRESS,
            )
            continue
        field = ServeSettings.model_fields[name]
        annotation = field.annotation
        if annotation in (Path | None, int | None):
            annotation = typing.get_args(annotation)[0]
        kwargs: dict[str, typing.Any] = {"dest": name, "default": None}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            choices = typing.get_args(annotation)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif annotation in (int, float, Path):
            kwargs["type"] = annotation
        default = shown_default(field.get_default(call_default_factory=True))
        doc = " ".join((field.description or "").split())
        # argparse %-formats help text: a literal % must be doubled.
        help_text = f"{doc} [env {env_var(name)}; default {default}]".replace("%", "%%")
        parser.add_argument(flag_name(name), help=help_text, **kwargs)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """ServeSettings from the flags given; the rest from LORAPLEX_* variables and defaults.

    Invalid settings end the command with exit 2 and one line per problem (no traceback).
    """
    overrides = {
        name: value
        for name in ServeSettings.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    try:
        return ServeSettings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            print(
                f"loraplex: invalid settings: {where + ': ' if where else ''}{message}",
                file=sys.stderr,
            )
        raise SystemExit(2) from None
