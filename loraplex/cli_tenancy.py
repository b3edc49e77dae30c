"""`loraplex tenants|keys|quotas`: manage tenants, API keys and quotas in the database.

They write the same database the router reads on every request, so changes (a new key,
a revocation, a quota) take effect without restarting the router.

The tenancy store and the database module are imported inside the functions that use
them: they pull SQLAlchemy and Alembic, +0.5 s on every `loraplex` command (`--help`
included) when imported here, since cli.py imports this module to build its parser
(measured with `python -X importtime`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing
from collections.abc import Callable
from datetime import datetime, timezone

from loraplex.cli_flags import add_settings_flags, settings_from_args

if typing.TYPE_CHECKING:
    from loraplex.router.tenancy.store import TenancyStore

# The limits of a quota, as `quotas set` flags and `--clear` values name them.
QUOTA_LIMITS = ("requests-per-minute", "tokens-per-minute", "max-concurrent")


def _store(args: argparse.Namespace) -> TenancyStore:
    # SQLAlchemy and Alembic: see the module docstring.
    from loraplex.database import create_db_engine, migrate
    from loraplex.router.tenancy.store import TenancyStore

    url = settings_from_args(args).resolved_database_url()
    engine = create_db_engine(url)
    migrate(engine)
    return TenancyStore(engine)


def _run(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Store errors become `error: <field>: <message>` and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from loraplex.router.tenancy.store import TenancyError  # SQLAlchemy: see the top

        try:
            return action(args)
        except TenancyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def _print(args: argparse.Namespace, data: list[dict], header: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _table([[("-" if d[h] is None else d[h]) for h in header] for d in data], header)


@_run
def cmd_tenants_create(args: argparse.Namespace) -> int:
    tenant = _store(args).create_tenant(args.name)
    print(f"created tenant {tenant.name}", file=sys.stderr)
    return 0


@_run
def cmd_tenants_list(args: argparse.Namespace) -> int:
    rows = [
        {"name": t.name, "created": _when(t.created_at), "active_keys": t.active_keys}
        for t in _store(args).list_tenants()
    ]
    _print(args, rows, ["name", "created", "active_keys"])
    return 0


@_run
def cmd_tenants_delete(args: argparse.Namespace) -> int:
    # SQLAlchemy: see the module docstring.
    from loraplex.adapters.blob_store import open_blob_store
    from loraplex.adapters.catalog import Catalog
    from loraplex.router.tenancy.tenant_adapters import delete_tenant

    settings = settings_from_args(args)
    store = _store(args)
    # The catalog lives in the tenancy database: its rows go in the tenant's transaction.
    blobs = open_blob_store(settings.registry_store, settings.registry_s3_endpoint_url or None)
    deleted = delete_tenant(store, args.name, Catalog(store.engine), blobs)
    adapters = f", and its adapters {', '.join(deleted.adapters)}" if deleted.adapters else ""
    print(f"deleted tenant {args.name} with its keys and quotas{adapters}", file=sys.stderr)
    for digest in deleted.blobs_left:
        print(
            f"warning: blob {digest} (no longer in the catalog) could not be deleted from the "
            "store; delete it there later",
            file=sys.stderr,
        )
    return 0


@_run
def cmd_keys_create(args: argparse.Namespace) -> int:
    from loraplex.router.tenancy.store import TenancyError, parse_expiry  # SQLAlchemy: see top

    if (args.tenant is None) != args.admin:
        raise TenancyError("tenant", "give either --tenant NAME or --admin")
    expires_at = parse_expiry(args.expires, time.time()) if args.expires else None
    raw, info = _store(args).create_key(args.tenant, expires_at, args.description)
    owner = f"tenant {info.tenant}" if info.tenant else "admin"
    print(
        f"created key {info.prefix}… for {owner}, expires {_when(info.expires_at)}. "
        "It is shown only now: store it.",
        file=sys.stderr,
    )
    print(raw)
    return 0


@_run
def cmd_keys_list(args: argparse.Namespace) -> int:
    now = time.time()
    rows = [
        {
            "prefix": k.prefix,
            "tenant": k.tenant or "(admin)",
            "status": k.status(now),
            "created": _when(k.created_at),
            "expires": _when(k.expires_at),
            "revoked": _when(k.revoked_at),
            "description": k.description,
        }
        for k in _store(args).list_keys(args.tenant)
    ]
    _print(args, rows, ["prefix", "tenant", "status", "created", "expires", "revoked"])
    return 0


@_run
def cmd_keys_revoke(args: argparse.Namespace) -> int:
    info = _store(args).revoke_key(args.prefix)
    print(f"revoked key {info.prefix}… at {_when(info.revoked_at)}", file=sys.stderr)
    return 0


@_run
def cmd_quotas_set(args: argparse.Namespace) -> int:
    from loraplex.router.tenancy.store import TenancyError  # SQLAlchemy: see the top

    # Only what is passed changes: a limit given is set, one named by --clear is removed,
    # the others keep their value.
    limits: dict[str, int | None] = {}
    for flag in QUOTA_LIMITS:
        field = flag.replace("-", "_")
        value = getattr(args, field)
        if value is not None and flag in args.clear:
            raise TenancyError(field, f"both --{flag} and --clear {flag} given")
        if value is not None:
            limits[field] = value
        elif flag in args.clear:
            limits[field] = None
    quota = _store(args).set_quota(args.tenant, args.adapter or "", **limits)
    scope = f"adapter {quota.adapter} for " if quota.adapter else ""
    print(f"quota set for {scope}tenant {quota.tenant}", file=sys.stderr)
    return 0


@_run
def cmd_quotas_list(args: argparse.Namespace) -> int:
    rows = [
        {
            "tenant": q.tenant,
            "adapter": q.adapter or "(all)",
            "requests_per_minute": q.requests_per_minute,
            "tokens_per_minute": q.tokens_per_minute,
            "max_concurrent": q.max_concurrent,
        }
        for q in _store(args).list_quotas(args.tenant)
    ]
    header = ["tenant", "adapter", "requests_per_minute", "tokens_per_minute", "max_concurrent"]
    _print(args, rows, header)
    return 0


@_run
def cmd_quotas_delete(args: argparse.Namespace) -> int:
    _store(args).delete_quota(args.tenant, args.adapter or "")
    print(f"deleted quota of tenant {args.tenant}", file=sys.stderr)
    return 0


def _common(parser: argparse.ArgumentParser, listing: bool = False) -> None:
    add_settings_flags(parser, ["database_url"])
    if listing:
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_tenancy_commands(commands: typing.Any) -> None:
    """Add `tenants`, `keys` and `quotas` to the `loraplex` subcommands."""
    tenants = commands.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="tenants_command", required=True
    )
    create = tenants.add_parser(
        "create",
        help="create a tenant",
        description="A tenant calls the base model, public/* and its own <tenant>/* adapters. "
        "Once any tenant exists, every API call needs a key.",
    )
    create.add_argument("name", help="tenant name, also the first part of its adapter names")
    _common(create)
    create.set_defaults(func=cmd_tenants_create)
    listing = tenants.add_parser("list", help="list tenants")
    _common(listing, listing=True)
    listing.set_defaults(func=cmd_tenants_list)
    delete = tenants.add_parser(
        "delete",
        help="delete a tenant with its keys, quotas and registry adapters",
        description="Deletes the tenant, its keys and quotas, and every version of its "
        "registry adapters (tenant/*), then the blobs no other adapter uses: a tenant "
        "created later under the same name starts with no adapters.",
    )
    delete.add_argument("name")
    _common(delete)
    add_settings_flags(delete, ["registry_store", "registry_s3_endpoint_url"])
    delete.set_defaults(func=cmd_tenants_delete)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser(
        "create",
        help="create an API key (printed once on stdout)",
        description="Prints the new key on stdout, once; only its hash is stored.",
    )
    create.add_argument("--tenant", default=None, help="the tenant the key belongs to")
    create.add_argument("--admin", action="store_true", help="an admin key instead")
    create.add_argument(
        "--expires",
        default=None,
        help="expiry: a duration from now (30d, 12h, 15m, 90s, 2w) or an ISO 8601 time",
    )
    create.add_argument("--description", default="", help="free text shown by keys list")
    _common(create)
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="list keys (public prefix only)")
    listing.add_argument("--tenant", default=None, help="only this tenant's keys")
    _common(listing, listing=True)
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key (effective on the next request)")
    revoke.add_argument("prefix", help="the key's prefix as shown by keys list (lpx_…)")
    _common(revoke)
    revoke.set_defaults(func=cmd_keys_revoke)

    quotas = commands.add_parser("quotas", help="manage per-tenant quotas").add_subparsers(
        dest="quotas_command", required=True
    )
    qset = quotas.add_parser(
        "set",
        help="set a tenant's (or one adapter's) limits",
        description="Sets the limits given, for the tenant or, with --adapter, for one "
        "adapter of that tenant; limits not given keep their value (none, for a new quota), "
        "and --clear LIMIT removes one. Over a limit the API answers 429 with Retry-After.",
    )
    qset.add_argument("--tenant", required=True)
    qset.add_argument("--adapter", default=None, help="limit only this model name")
    for flag in QUOTA_LIMITS:
        qset.add_argument(f"--{flag}", type=_positive_int, default=None)
    qset.add_argument(
        "--clear",
        action="append",
        choices=QUOTA_LIMITS,
        default=[],
        metavar="LIMIT",
        help=f"remove this limit (repeatable): {', '.join(QUOTA_LIMITS)}",
    )
    _common(qset)
    qset.set_defaults(func=cmd_quotas_set)
    listing = quotas.add_parser("list", help="list quotas")
    listing.add_argument("--tenant", default=None)
    _common(listing, listing=True)
    listing.set_defaults(func=cmd_quotas_list)
    delete = quotas.add_parser("delete", help="remove a tenant's (or one adapter's) limits")
    delete.add_argument("--tenant", required=True)
    delete.add_argument("--adapter", default=None)
    _common(delete)
    delete.set_defaults(func=cmd_quotas_delete)
