"""`loraplex adapters publish|list|alias|rollback|delete`: the registry from the command line.

Errors name the file, field or adapter at fault and exit with status 2 (bad
input, refused change) or 3 (store or database unreachable).

The catalog side (loraplex.adapters.registry, .catalog, .publish) is imported inside
the functions that use it: it pulls SQLAlchemy, +0.35 s on every `loraplex` command
(`--help` included) when imported here, since cli.py imports this module to build
its parser (measured with `python -X importtime`).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import socket
import sys
import typing
from pathlib import Path

from safetensors import safe_open

from loraplex.adapters.blob_store import StoreUnavailable
from loraplex.adapters.compat import BaseModelRef
from loraplex.adapters.manifest import sha256_file
from loraplex.adapters.names import InvalidAdapterName
from loraplex.adapters.refs import (
    check_alias,
    parse_adapter_ref,
    parse_registry_name,
)
from loraplex.adapters.splits import format_weights, parse_guard, parse_weights
from loraplex.base_model import COMPLETE_MARKER, base_model_dir
from loraplex.cli_eval import add_eval_commands
from loraplex.cli_flags import add_settings_flags, settings_from_args
from loraplex.settings import ServeSettings

if typing.TYPE_CHECKING:
    from loraplex.adapters.publish import PublishResult
    from loraplex.adapters.registry import Registry

log = logging.getLogger("loraplex.cli")

# The settings a registry command reads, each also one of its flags.
REGISTRY_FLAGS = (
    "database_url",
    "registry_store",
    "registry_s3_endpoint_url",
    "registry_cache_dir",
    "base_model",
    "model_cache",
    "max_lora_rank",
    "registry_max_adapter_mib",
)
EXIT_REFUSED = 2
EXIT_UNAVAILABLE = 3


def _open(args: argparse.Namespace) -> Registry:
    from loraplex.adapters.registry import Registry, RegistryConfig  # SQLAlchemy: see top

    return Registry.open(RegistryConfig.from_settings(settings_from_args(args)))


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _run(args: argparse.Namespace, action: typing.Callable[[], int]) -> int:
    """Map registry errors to messages and exit codes, in one place."""
    # SQLAlchemy (and the catalog built on it): see the module docstring.
    from sqlalchemy.exc import SQLAlchemyError

    from loraplex.adapters.catalog import CatalogConflict, CatalogLookupError
    from loraplex.adapters.publish import PublishRejected
    from loraplex.adapters.quality_gate import QualityGateRefused
    from loraplex.router.tenancy.store import TenancyError

    try:
        return action()
    except (
        PublishRejected,
        CatalogConflict,
        InvalidAdapterName,
        CatalogLookupError,
        TenancyError,
        QualityGateRefused,
    ) as exc:
        _err(str(exc))
        return EXIT_REFUSED
    except StoreUnavailable as exc:
        _err(f"adapter store unavailable: {exc}")
        return EXIT_UNAVAILABLE
    except SQLAlchemyError as exc:
        _err(f"catalog database unavailable: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return EXIT_UNAVAILABLE


def served_base(settings: ServeSettings) -> tuple[BaseModelRef | None, set[str] | None]:
    """The served base model as the publish checks need it: (BaseModelRef | None, modules).

    None where the base is not a local folder (a hub id): those checks are skipped.
    """
    folder = base_model_dir(settings.base_model, settings.model_cache)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return None, None
    marker = folder / COMPLETE_MARKER
    digest = None
    if marker.is_file():  # the pull recorded (and verified) every file's hash
        digest = json.loads(marker.read_text()).get("files", {}).get("model.safetensors")
    if digest is None:
        digest = sha256_file(weights)
    with safe_open(str(weights), framework="numpy") as handle:
        # model.layers.N.self_attn.q_proj.weight → q_proj: what LoRA may target.
        modules = {
            key.split(".")[-2]
            for key in handle.keys()  # noqa: SIM118 (safe_open is not a mapping)
            if key.startswith("model.layers.")
            and key.endswith(".weight")
            and len(handle.get_slice(key).get_shape()) == 2
        }
    return BaseModelRef(folder.name, digest), modules


def cmd_publish(args: argparse.Namespace) -> int:
    # SQLAlchemy: see top.
    from loraplex.adapters.publish import PublishChecks, QualityPolicy, publish
    from loraplex.router.tenancy.store import TenancyStore
    from loraplex.router.tenancy.tenant_adapters import require_publish_tenant

    def action() -> int:
        name = parse_registry_name(args.name)
        settings = settings_from_args(args)
        base, modules = served_base(settings)
        if base is None:
            print(
                "warning: base model is not a local folder; base-model checks skipped",
                file=sys.stderr,
            )
        checks = PublishChecks(
            max_lora_rank=settings.max_lora_rank,
            max_bytes=settings.registry_max_adapter_mib * 2**20,
            served_base=base,
            known_modules=modules,
        )
        registry = _open(args)
        # Publishing needs the tenant (router/tenancy/tenant_adapters.py); checked before
        # the upload, so a refused publish stores nothing.
        require_publish_tenant(TenancyStore(registry.catalog.engine), name)
        result = publish(
            args.dir,
            name,
            catalog=registry.catalog,
            store=registry.store,
            checks=checks,
            quality=QualityPolicy(args.min_gain, args.force, who_forced() if args.force else None),
            progress=lambda line: print(f"  {line}", file=sys.stderr),
        )
        print(publish_summary(result))
        return 0

    return _run(args, action)


def who_forced() -> str:
    """user@host: who the catalog records as forcing a publish past the quality gate."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def publish_summary(result: PublishResult) -> str:
    record = result.record
    if result.created:
        line = f"published {record.ref} (@latest) {record.version_id}"
    elif result.repaired:
        line = f"repaired: {record.ref} (@latest) already has this content"
    else:
        line = f"unchanged: {record.ref} (@latest) already has this content"
    if result.repaired:
        line += "; its blob failed verification in the store and was replaced"
    if result.gate is not None and result.gate.forced_by is not None:
        line += f"\nquality gate forced by {result.gate.forced_by} (recorded): {result.gate.reason}"
    return line


def cmd_list(args: argparse.Namespace) -> int:
    def action() -> int:
        adapters = _open(args).catalog.list_adapters(args.tenant)
        if args.json:
            print(json.dumps([a.to_json() for a in adapters], indent=2))
            return 0
        if not adapters:
            print("no adapters" + (f" for tenant {args.tenant}" if args.tenant else ""))
        for adapter in adapters:
            aliases = " ".join(
                f"@{a}="
                + format_weights(adapter.weights.get(a, {n: 100}))
                + (f" [guard {adapter.guards[a]}]" if a in adapter.guards else "")
                for a, n in sorted(adapter.aliases.items())
            )
            print(f"{adapter.name}  {aliases}")
            for event in adapter.events:  # automatic rollbacks, newest first
                print(f"  {event.at:%Y-%m-%d %H:%M:%S}  {event.kind}: {event.detail}")
            for v in adapter.versions:
                # A weighted alias names every version of its split, with its share.
                labels = [f"@{a}" for a in v.aliases if a not in adapter.weights] + [
                    f"@{a}:{split[v.number]}%"
                    for a, split in sorted(adapter.weights.items())
                    if v.number in split
                ]
                print(
                    f"  v{v.number:<4} {v.digest[:12]}  {v.size_bytes / 1e6:8.1f} MB  "
                    f"{v.published_at:%Y-%m-%d %H:%M:%S}  {' '.join(labels)}"
                )
        return 0

    return _run(args, action)


def cmd_alias(args: argparse.Namespace) -> int:
    """`alias tenant/name ALIAS --to v3=90,v4=10 [--guard ...]`, or the older
    `alias tenant/name@ALIAS vN`."""

    def action() -> int:
        ref = parse_adapter_ref(args.ref)
        if ref.version is not None:
            _err(f"{args.ref!r}: expected tenant/name ALIAS (or tenant/name@alias)")
            return EXIT_REFUSED
        if ref.alias is not None:  # tenant/name@alias [vN | --to ...]
            alias, target = ref.alias, args.target
        elif args.target is None:
            _err(f"{args.ref}: name the alias, e.g. `loraplex adapters alias {ref.name} prod`")
            return EXIT_REFUSED
        else:
            alias, target = check_alias(args.target), None
        if (target is None) == (args.to is None):
            _err(
                f"{' '.join(filter(None, [args.ref, args.target]))}: expected "
                "tenant/name@alias vN, or tenant/name ALIAS --to vN (or --to v3=90,v4=10)"
            )
            return EXIT_REFUSED
        weights = parse_weights(args.to or target)
        guard = str(parse_guard(args.guard)) if args.guard else None
        previous = _open(args).catalog.set_alias_weights(ref.name, alias, weights, guard)
        was = f" (was {format_weights(previous)})" if previous is not None else ""
        guarded = f", rollback guard {guard}" if guard else ""
        print(f"{ref.name}@{alias} → {format_weights(weights)}{was}{guarded}")
        return 0

    return _run(args, action)


def cmd_rollback(args: argparse.Namespace) -> int:
    def action() -> int:
        name = parse_registry_name(args.name)
        old, new = _open(args).catalog.rollback(name)
        print(f"{name}@latest → v{new} (was v{old})")
        return 0

    return _run(args, action)


def cmd_delete(args: argparse.Namespace) -> int:
    def action() -> int:
        ref = parse_adapter_ref(args.ref)
        if ref.alias is not None:
            _err(f"{args.ref!r}: name a version (tenant/name:vN) or the adapter (tenant/name)")
            return EXIT_REFUSED
        if ref.version is None:
            # Only an entry without versions (lifecycle.py); one with versions is refused.
            _open(args).delete_adapter(parse_registry_name(args.ref))
            print(f"deleted {ref.name} (it had no version left)")
            return 0
        result = _open(args).delete_version(ref.name, ref.version, force=args.force)
        for alias, target in result.aliases_moved.items():
            where = f"moved to v{target}" if target is not None else "removed"
            print(f"  @{alias} {where}", file=sys.stderr)
        print(f"deleted {result.deleted.ref}")
        if result.adapter_removed:
            print(
                f"{ref.name} has no version left and is no longer in the registry "
                "(a local adapter folder of that name is served again)"
            )
        return 0

    return _run(args, action)


def add_registry_commands(adapters: typing.Any) -> None:
    """Add the registry subcommands to the `loraplex adapters` subparser group."""
    publish = adapters.add_parser(
        "publish",
        help="publish an adapter folder as the next immutable version (moves @latest)",
        description="Check the folder (peft files, size limit, vLLM compatibility, and, when it "
        "has a manifest.json, that it was trained on the served base model), the quality gate "
        "(the manifest's held-out adapter score beats its few-shot baseline by --min-gain), "
        "upload it content-addressed to the store (a stored copy is verified, and replaced "
        "when corrupt), then add version vN and move @latest in one catalog transaction. A "
        "rejected publish changes nothing.",
    )
    publish.add_argument("dir", type=Path, help="adapter folder (peft format)")
    publish.add_argument("--name", required=True, help="tenant/name")
    publish.add_argument(
        "--min-gain",
        type=float,
        default=0.0,
        help="quality gate: required held-out gain of the adapter over its best few-shot "
        "baseline (manifest.json eval), in metric units: 0.05 = 5 points (default 0: not worse)",
    )
    publish.add_argument(
        "--force",
        action="store_true",
        help="publish even if the quality gate refuses (worse than its baseline, or no "
        "held-out scores); recorded in the catalog with user@host",
    )
    add_settings_flags(publish, REGISTRY_FLAGS)
    publish.set_defaults(func=cmd_publish)

    listing = adapters.add_parser("list", help="list registry adapters, versions and aliases")
    listing.add_argument("--tenant", default=None, help="only this tenant's adapters")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    add_settings_flags(listing, REGISTRY_FLAGS)
    listing.set_defaults(func=cmd_list)

    alias = adapters.add_parser(
        "alias",
        help="point an alias at a version, or split it between versions (canary)",
        description="Point tenant/name ALIAS at one version (--to v4) or split its requests "
        "by integer weights summing to 100 (--to v3=90,v4=10). Each end user (the request's "
        "`user`, else its x-loraplex-session header, else its API key) keeps getting the same "
        "version while the weights stand. The heaviest version is the incumbent; --guard "
        "rolls the alias back to it alone when a canary's server-error rate is worse by the "
        "factor over its last min_requests requests. Takes effect on the next request on "
        "every router. The older form `alias tenant/name@alias vN` still works.",
    )
    alias.add_argument("ref", help="tenant/name (or tenant/name@alias)")
    alias.add_argument("target", nargs="?", help="ALIAS (or vN after tenant/name@alias)")
    alias.add_argument("--to", default=None, help="vN, or vN=WEIGHT,vM=WEIGHT summing to 100")
    alias.add_argument(
        "--guard",
        default=None,
        help="automatic rollback of a weighted alias, e.g. error_rate<=2x,min_requests=200",
    )
    add_settings_flags(alias, REGISTRY_FLAGS)
    alias.set_defaults(func=cmd_alias)

    rollback = adapters.add_parser(
        "rollback", help="move @latest back to the version before the one it points at"
    )
    rollback.add_argument("name", help="tenant/name")
    add_settings_flags(rollback, REGISTRY_FLAGS)
    rollback.set_defaults(func=cmd_rollback)

    delete = adapters.add_parser(
        "delete",
        help="delete one version (refused while an alias points at it, unless --force)",
        description="Delete tenant/name:vN. With --force, @latest moves to the newest "
        "remaining version and other aliases pointing at it are removed. Its blob is "
        "deleted from the store when no other version uses the same content. Deleting the "
        "last version removes the adapter from the registry (its aliases with it), so a "
        "local adapter folder of that name is served again; publishing the name later "
        "continues at the next version number.",
    )
    delete.add_argument(
        "ref", help="tenant/name:vN, or tenant/name to remove an entry with no version left"
    )
    delete.add_argument("--force", action="store_true", help="delete even if aliased")
    add_settings_flags(delete, REGISTRY_FLAGS)
    delete.set_defaults(func=cmd_delete)

    add_eval_commands(adapters, REGISTRY_FLAGS)  # eval, show (cli_eval.py)
