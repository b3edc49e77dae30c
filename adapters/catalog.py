"""The registry catalog: adapters, their numbered immutable versions, and aliases.

Tables live in loraplex's one database (SQLite by default, any SQLAlchemy URL);
their schema is the Alembic branch `registry` (loraplex/migrations). A version
row names its content by digest; the blob itself is in the store. Version
numbers are never reused, even after a delete, so `:v3` always meant one thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from loraplex.adapters.content import version_id
from loraplex.adapters.names import AdapterName
from loraplex.adapters.refs import LATEST, AdapterRef
from loraplex.adapters.splits import TOTAL_WEIGHT, check_weights, incumbent_of, parse_guard

metadata = sa.MetaData()
adapters_table = sa.Table(
    "registry_adapters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(129), nullable=False, unique=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("last_number", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime, nullable=False),
)
versions_table = sa.Table(
    "registry_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "adapter_id",
        sa.Integer,
        sa.ForeignKey("registry_adapters.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("manifest", sa.JSON, nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("published_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("adapter_id", "number", name="uq_registry_version_number"),
)
aliases_table = sa.Table(
    "registry_aliases",
    metadata,
    sa.Column(
        "adapter_id",
        sa.Integer,
        sa.ForeignKey("registry_adapters.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("alias", sa.String(64), primary_key=True),
    # RESTRICT: a version an alias points at cannot be deleted from under it.
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("registry_versions.id", ondelete="RESTRICT"),
        nullable=False,
    ),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("guard", sa.String(200), nullable=True),
)


# Weighted aliases, their rollback guards' shared counters and events (registry_0002).
def _adapter_fk(**column: Any) -> sa.Column:
    return sa.Column(
        "adapter_id",
        sa.Integer,
        sa.ForeignKey("registry_adapters.id", ondelete="CASCADE"),
        **column,
    )


alias_weights_table = sa.Table(
    "registry_alias_weights",
    metadata,
    _adapter_fk(primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
    # RESTRICT: a version in a split cannot be deleted from under it.
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("registry_versions.id", ondelete="RESTRICT"),
        primary_key=True,
    ),
    sa.Column("weight", sa.Integer, nullable=False),
)
rollout_counts_table = sa.Table(
    "registry_rollout_counts",
    metadata,
    _adapter_fk(primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("registry_versions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("prev_requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("prev_errors", sa.Integer, nullable=False, server_default="0"),
)
alias_events_table = sa.Table(
    "registry_alias_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    _adapter_fk(nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("detail", sa.String(1000), nullable=False),
)


class CatalogLookupError(LookupError):
    """The adapter, version or alias does not exist; the message says which."""


class UnknownAdapter(CatalogLookupError):
    """No adapter of that name is in the registry at all."""


class CatalogConflict(ValueError):
    """The change is refused as asked (e.g. deleting a version an alias points at)."""


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _utc_naive(moment: datetime) -> datetime:
    """The catalog's times are naive UTC (its columns have no zone). A zoned time is first
    moved to UTC: SQLite would keep its wall-clock digits and PostgreSQL convert them to
    the session's zone, so one moment would read back differently on each."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class VersionRecord:
    adapter: str
    tenant: str
    number: int
    digest: str
    size_bytes: int
    manifest: dict[str, Any] | None
    created_at: datetime
    published_at: datetime
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.adapter}:v{self.number}"

    @property
    def version_id(self) -> str:
        return version_id(self.digest)


@dataclass(frozen=True)
class AliasTarget:
    """What a reference names now: one version, or an alias's weighted split."""

    versions: tuple[tuple[VersionRecord, int], ...]
    """(version, weight), older first; one version has weight 100."""
    incumbent: VersionRecord
    alias: str | None = None
    guard: str | None = None
    generation: datetime | None = None
    """When the alias was last set: rollout counters of an older setting are dropped."""

    @property
    def weighted(self) -> bool:
        return len(self.versions) > 1


@dataclass(frozen=True)
class AliasEvent:
    alias: str
    at: datetime
    kind: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "at": self.at.isoformat() + "Z",
            "kind": self.kind,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    tenant: str
    created_at: datetime
    versions: tuple[VersionRecord, ...]
    aliases: dict[str, int] = field(default_factory=dict)
    """Alias → the version it points at (a weighted alias: its incumbent)."""
    weights: dict[str, dict[int, int]] = field(default_factory=dict)
    """Weighted aliases only: alias → {version: weight}."""
    guards: dict[str, str] = field(default_factory=dict)
    events: tuple[AliasEvent, ...] = ()
    """Automatic rollbacks and the like, newest first."""

    def to_json(self) -> dict[str, Any]:
        """The view `adapters list --json` prints and `GET /admin/adapters` returns."""
        return {
            "name": self.name,
            "tenant": self.tenant,
            "aliases": self.aliases,
            "weights": {
                alias: {f"v{n}": w for n, w in split.items()}
                for alias, split in self.weights.items()
            },
            "guards": self.guards,
            "events": [event.to_json() for event in self.events],
            "versions": [
                {
                    "version": f"v{v.number}",
                    "id": v.version_id,
                    "sha256": v.digest,
                    "size_bytes": v.size_bytes,
                    "published_at": v.published_at.isoformat() + "Z",
                    "aliases": list(v.aliases),
                }
                for v in self.versions
            ],
        }


@dataclass(frozen=True)
class DeleteResult:
    deleted: VersionRecord
    aliases_moved: dict[str, int | None]
    """Aliases that pointed at the deleted version: new target number, or None if removed."""
    blob_unreferenced: bool
    """No version of any adapter uses the digest any more: its blob may be deleted."""


@dataclass(frozen=True)
class TenantAdaptersDeleted:
    adapters: tuple[str, ...]
    """The adapter names deleted (`tenant/name`)."""
    unreferenced_digests: tuple[str, ...]
    """Blobs no remaining version uses: they may be deleted from the store."""


_VERSION_COLUMNS = (
    versions_table.c.id,
    versions_table.c.number,
    versions_table.c.digest,
    versions_table.c.size_bytes,
    versions_table.c.manifest,
    versions_table.c.created_at,
    versions_table.c.published_at,
    adapters_table.c.name,
    adapters_table.c.tenant,
)


# The per-request lookups, built once with bound parameters: constructing a SQLAlchemy
# statement costs more than running it on SQLite (profiled: most of a lookup's time).
def _version_by_name(source: sa.FromClause) -> sa.Select:
    """The version columns from `source` (adapters outer-joined to the wanted version),
    for the adapter named by the bound parameter `name`."""
    return (
        sa.select(*_VERSION_COLUMNS)
        .select_from(source)
        .where(adapters_table.c.name == sa.bindparam("name"))
    )


_RESOLVE_VERSION = _version_by_name(
    adapters_table.outerjoin(
        versions_table,
        (versions_table.c.adapter_id == adapters_table.c.id)
        & (versions_table.c.number == sa.bindparam("number")),
    )
)
_RESOLVE_ALIAS = _version_by_name(
    adapters_table.outerjoin(
        aliases_table,
        (aliases_table.c.adapter_id == adapters_table.c.id)
        & (aliases_table.c.alias == sa.bindparam("alias")),
    ).outerjoin(versions_table, versions_table.c.id == aliases_table.c.version_id)
)
# An alias with its split: one row per weighted version, or one row (weight NULL) for an
# alias that points at one version; with the incumbent, guard and generation (updated_at).
_RESOLVE_SPLIT = (
    sa.select(
        *_VERSION_COLUMNS,
        alias_weights_table.c.weight,
        aliases_table.c.version_id.label("incumbent_id"),
        aliases_table.c.guard,
        aliases_table.c.updated_at.label("generation"),
    )
    .select_from(
        adapters_table.outerjoin(
            aliases_table,
            (aliases_table.c.adapter_id == adapters_table.c.id)
            & (aliases_table.c.alias == sa.bindparam("alias")),
        )
        .outerjoin(
            alias_weights_table,
            (alias_weights_table.c.adapter_id == aliases_table.c.adapter_id)
            & (alias_weights_table.c.alias == aliases_table.c.alias),
        )
        .outerjoin(
            versions_table,
            versions_table.c.id
            == sa.func.coalesce(alias_weights_table.c.version_id, aliases_table.c.version_id),
        )
    )
    .where(adapters_table.c.name == sa.bindparam("name"))
)


def _record(row: Any, aliases: tuple[str, ...] = ()) -> VersionRecord:
    return VersionRecord(
        adapter=row.name,
        tenant=row.tenant,
        number=row.number,
        digest=row.digest,
        size_bytes=row.size_bytes,
        manifest=row.manifest,
        created_at=row.created_at,
        published_at=row.published_at,
        aliases=aliases,
    )


class Catalog:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str) -> Catalog:
        """On the process's engine for `url` (shared with tenancy), its schema brought to the
        newest revision on first use (an empty database included)."""
        # Imported here: loraplex.database brings Alembic, 0.25-0.7 s of import on this
        # machine, which the vLLM plugin and the CLI pay for nothing when they import the
        # registry without opening a database.
        from loraplex.database import shared_engine

        return cls(shared_engine(url))

    # ---- reading -------------------------------------------------------------------------

    def resolve(self, ref: AdapterRef) -> VersionRecord:
        """The version `ref` names now. Raises UnknownAdapter when the adapter is not in the
        catalog, CatalogLookupError naming what is missing otherwise.

        One query (every request with an adapter name runs it; against a database over
        the network each round trip counts): the adapter row, outer-joined to the version
        the reference names, so a miss still tells "no such adapter" from "no such
        version or alias"."""
        if ref.version is not None:
            query, params = _RESOLVE_VERSION, {"number": ref.version}
            missing = f"adapter {ref.name} has no version v{ref.version}"
        else:
            alias = ref.alias or LATEST
            query, params = _RESOLVE_ALIAS, {"alias": alias}
            missing = (
                f"adapter {ref.name} has no alias @{alias}"
                if ref.alias
                else f"adapter {ref.name} has no published version"
            )
        with self.engine.connect() as conn:
            row = conn.execute(query, {"name": str(ref.name), **params}).first()
        if row is None:
            raise UnknownAdapter(f"adapter {ref.name} is not in the registry")
        if row.id is None:
            raise CatalogLookupError(missing)
        return _record(row)

    def resolve_target(self, ref: AdapterRef) -> AliasTarget:
        """Like `resolve`, with an alias's weighted split (still one query per request)."""
        if ref.version is not None:
            record = self.resolve(ref)
            return AliasTarget(((record, TOTAL_WEIGHT),), record)
        alias = ref.alias or LATEST
        with self.engine.connect() as conn:
            rows = conn.execute(_RESOLVE_SPLIT, {"name": str(ref.name), "alias": alias}).all()
        if not rows:
            raise UnknownAdapter(f"adapter {ref.name} is not in the registry")
        if rows[0].id is None:
            raise CatalogLookupError(
                f"adapter {ref.name} has no alias @{alias}"
                if ref.alias
                else f"adapter {ref.name} has no published version"
            )
        versions = tuple(
            sorted(
                ((_record(r), r.weight or TOTAL_WEIGHT) for r in rows), key=lambda p: p[0].number
            )
        )
        incumbent = next((r for r in rows if r.id == rows[0].incumbent_id), rows[0])
        return AliasTarget(versions, _record(incumbent), alias, rows[0].guard, rows[0].generation)

    def exists(self, name: AdapterName) -> bool:
        with self.engine.connect() as conn:
            query = sa.select(adapters_table.c.id).where(adapters_table.c.name == str(name))
            return conn.execute(query).first() is not None

    def list_adapters(self, tenant: str | None = None) -> list[AdapterRecord]:
        with self.engine.connect() as conn:
            query = sa.select(adapters_table).order_by(adapters_table.c.name)
            if tenant is not None:
                query = query.where(adapters_table.c.tenant == tenant)
            adapters = conn.execute(query).all()
            ids = [a.id for a in adapters]
            versions = conn.execute(
                sa.select(versions_table.c.adapter_id, *_VERSION_COLUMNS)
                .join(adapters_table, adapters_table.c.id == versions_table.c.adapter_id)
                .where(versions_table.c.adapter_id.in_(ids))
                .order_by(versions_table.c.number)
            ).all()
            aliases = conn.execute(
                sa.select(
                    aliases_table.c.adapter_id, aliases_table.c.alias, versions_table.c.number
                )
                .join(versions_table, versions_table.c.id == aliases_table.c.version_id)
                .where(aliases_table.c.adapter_id.in_(ids))
                .order_by(aliases_table.c.alias)
            ).all()
            splits = rollout_state.splits_of(conn, ids)
            events = rollout_state.events_of(conn, ids)
        result = []
        for adapter in adapters:
            alias_map = {a.alias: a.number for a in aliases if a.adapter_id == adapter.id}
            records = tuple(
                _record(v, tuple(name for name, n in alias_map.items() if n == v.number))
                for v in versions
                if v.adapter_id == adapter.id
            )
            weights, guards = splits.get(adapter.id, ({}, {}))
            result.append(
                AdapterRecord(
                    adapter.name,
                    adapter.tenant,
                    adapter.created_at,
                    records,
                    alias_map,
                    weights,
                    guards,
                    tuple(events.get(adapter.id, ())),
                )
            )
        return result

    def digest_in_use(self, digest: str) -> bool:
        with self.engine.connect() as conn:
            query = sa.select(versions_table.c.id).where(versions_table.c.digest == digest)
            return conn.execute(query.limit(1)).first() is not None

    # ---- changing ------------------------------------------------------------------------

    def add_version(
        self,
        name: AdapterName,
        digest: str,
        size_bytes: int,
        manifest: dict[str, Any] | None,
        created_at: datetime | None = None,
    ) -> tuple[VersionRecord, bool]:
        """Publish a new version and move @latest to it, in one transaction.

        Returns (version, created). When @latest already has exactly this content,
        nothing changes and (that version, False) is returned.
        """
        created_at = _utc_naive(created_at) if created_at else _now()
        for _attempt in range(5):
            try:
                return self._add_version_once(name, digest, size_bytes, manifest, created_at)
            except IntegrityError:
                continue  # a concurrent publish took the number (or created the adapter)
        raise CatalogConflict(f"could not publish {name}: too many concurrent publishes")

    def _add_version_once(
        self,
        name: AdapterName,
        digest: str,
        size_bytes: int,
        manifest: dict[str, Any] | None,
        created_at: datetime,
    ) -> tuple[VersionRecord, bool]:
        with self.engine.begin() as conn:
            # Locked: concurrent publishes of one adapter take turns (see `_lock_adapter`).
            self._lock_adapter(conn, str(name))
            row = conn.execute(
                sa.select(adapters_table).where(adapters_table.c.name == str(name))
            ).first()
            if row is None:
                adapter_id = conn.execute(
                    adapters_table.insert().values(
                        name=str(name), tenant=name.tenant, last_number=0, created_at=created_at
                    )
                ).inserted_primary_key[0]
                last = 0
            else:
                adapter_id, last = row.id, row.last_number
                latest = self._alias_version(conn, adapter_id, LATEST)
                if latest is not None and latest.digest == digest:
                    return _record(latest), False
            number = last + 1
            # Only a first publish can race here (no row to lock yet): if another publish
            # moved last_number meanwhile, retry.
            moved = conn.execute(
                adapters_table.update()
                .where(adapters_table.c.id == adapter_id, adapters_table.c.last_number == last)
                .values(last_number=number)
            ).rowcount
            if moved != 1:
                raise IntegrityError("last_number changed", None, ValueError())
            published_at = _now()
            version_row_id = conn.execute(
                versions_table.insert().values(
                    adapter_id=adapter_id,
                    number=number,
                    digest=digest,
                    size_bytes=size_bytes,
                    manifest=manifest,
                    created_at=created_at,
                    published_at=published_at,
                )
            ).inserted_primary_key[0]
            self._set_alias(conn, adapter_id, LATEST, version_row_id)
        record = VersionRecord(
            str(name),
            str(name.tenant),
            number,
            digest,
            size_bytes,
            manifest,
            created_at,
            published_at,
            (LATEST,),
        )
        return record, True

    def set_alias(self, name: AdapterName, alias: str, number: int) -> int | None:
        """Point `alias` at version `number` alone; returns the number it pointed at before
        (a weighted alias: its incumbent)."""
        previous = self.set_alias_weights(name, alias, {number: TOTAL_WEIGHT})
        return incumbent_of(previous) if previous else None

    def set_alias_weights(
        self, name: AdapterName, alias: str, weights: dict[int, int], guard: str | None = None
    ) -> dict[int, int] | None:
        """Point `alias` at one version ({vN: 100}) or split it by integer weights summing to
        100, with an optional rollback guard (`error_rate<=2x,min_requests=200`, weighted
        aliases only). Returns the weights it had before (None: a new alias). The split's
        rollout counters start from zero."""
        weights = check_weights(weights)
        if guard is not None:
            guard = str(parse_guard(guard))
            if len(weights) < 2:
                raise CatalogConflict(
                    f"a rollback guard needs a canary: give {name}@{alias} two or more "
                    "weighted versions (e.g. --to v3=90,v4=10)"
                )
        with self.engine.begin() as conn:
            adapter_id = self._locked_adapter_id(conn, str(name))
            ids = dict(
                conn.execute(
                    sa.select(versions_table.c.number, versions_table.c.id).where(
                        versions_table.c.adapter_id == adapter_id,
                        versions_table.c.number.in_(list(weights)),
                    )
                ).all()
            )
            missing = [n for n in weights if n not in ids]
            if missing:
                raise CatalogLookupError(
                    f"adapter {name} has no version "
                    + ", ".join(f"v{n}" for n in missing)
                    + " (deleted or never published)"
                )
            previous = rollout_state.current_weights(conn, adapter_id, alias)
            self._set_alias(conn, adapter_id, alias, ids[incumbent_of(weights)], guard)
            if len(weights) > 1:
                rollout_state.write_split(
                    conn, adapter_id, alias, {ids[n]: w for n, w in weights.items()}
                )
        return previous

    def record_outcomes(
        self,
        name: AdapterName,
        alias: str,
        generation: datetime,
        outcomes: dict[int, tuple[int, int]],
    ) -> AliasEvent | None:
        """Add a router's (requests, server errors) per version to a guarded alias's shared
        counters and apply its guard: the rollback event when it moved the alias back to
        its incumbent alone, else None. Counts for an older setting of the alias (another
        `generation`) are dropped."""
        with self.engine.begin() as conn:
            adapter_id = self._locked_adapter_id(conn, str(name))
            return rollout_state.record_outcomes(
                conn, adapter_id, str(name), alias, generation, outcomes, _now()
            )

    def rollback(self, name: AdapterName) -> tuple[int, int]:
        """Move @latest to the newest version older than the one it points at: (from, to)."""
        with self.engine.begin() as conn:
            adapter_id = self._locked_adapter_id(conn, str(name))
            current = self._alias_version(conn, adapter_id, LATEST)
            if current is None:
                raise CatalogLookupError(f"adapter {name} has no published version")
            previous = conn.execute(
                sa.select(versions_table.c.id, versions_table.c.number)
                .where(
                    versions_table.c.adapter_id == adapter_id,
                    versions_table.c.number < current.number,
                )
                .order_by(versions_table.c.number.desc())
                .limit(1)
            ).first()
            if previous is None:
                raise CatalogConflict(
                    f"{name}@latest is v{current.number}, and there is no older version to "
                    "roll back to"
                )
            self._set_alias(conn, adapter_id, LATEST, previous.id)
        return current.number, previous.number

    def delete_version(self, name: AdapterName, number: int, force: bool = False) -> DeleteResult:
        """Delete `name:vN`. Refused while aliases point at it unless `force`, which moves
        @latest to the newest remaining version and removes other aliases."""
        with self.engine.begin() as conn:
            adapter_id = self._locked_adapter_id(conn, str(name))
            row = conn.execute(
                sa.select(*_VERSION_COLUMNS)
                .join(adapters_table, adapters_table.c.id == versions_table.c.adapter_id)
                .where(versions_table.c.adapter_id == adapter_id, versions_table.c.number == number)
            ).first()
            if row is None:
                raise CatalogLookupError(f"adapter {name} has no version v{number}")
            # Even with --force: dropping a version from a split would leave weights that
            # no longer sum to 100, so the operator chooses the new split.
            rollout_state.refuse_if_weighted(conn, adapter_id, row.id, f"{name}:v{number}")
            aliases = [
                a.alias
                for a in conn.execute(
                    sa.select(aliases_table.c.alias).where(aliases_table.c.version_id == row.id)
                ).all()
            ]
            if aliases and not force:
                listed = ", ".join(f"@{a}" for a in sorted(aliases))
                raise CatalogConflict(
                    f"{name}:v{number} is in use by {listed}; point the alias elsewhere "
                    "(`loraplex adapters alias` / `rollback`) or delete with --force"
                )
            moved: dict[str, int | None] = {}
            replacement = conn.execute(
                sa.select(versions_table.c.id, versions_table.c.number)
                .where(versions_table.c.adapter_id == adapter_id, versions_table.c.id != row.id)
                .order_by(versions_table.c.number.desc())
                .limit(1)
            ).first()
            for alias in aliases:
                if alias == LATEST and replacement is not None:
                    self._set_alias(conn, adapter_id, alias, replacement.id)
                    moved[alias] = replacement.number
                else:
                    conn.execute(
                        aliases_table.delete().where(
                            aliases_table.c.adapter_id == adapter_id,
                            aliases_table.c.alias == alias,
                        )
                    )
                    moved[alias] = None
            conn.execute(versions_table.delete().where(versions_table.c.id == row.id))
            still_used = conn.execute(
                sa.select(versions_table.c.id).where(versions_table.c.digest == row.digest).limit(1)
            ).first()
        return DeleteResult(_record(row, tuple(aliases)), moved, still_used is None)

    def delete_tenant_adapters(
        self, tenant: str, conn: sa.Connection | None = None
    ) -> TenantAdaptersDeleted:
        """Delete every adapter of `tenant` with its versions, aliases and every row that
        refers to them, so a tenant created later under the same name starts empty. With
        `conn`, inside the caller's transaction (the tenant's own rows go in the same
        commit); otherwise in a transaction of its own. The blobs are the caller's to delete
        after the commit."""
        if conn is None:
            with self.engine.begin() as own:
                return self.delete_tenant_adapters(tenant, own)
        owned = sa.select(adapters_table.c.id).where(adapters_table.c.tenant == tenant)
        owned_versions = sa.select(versions_table.c.id).where(
            versions_table.c.adapter_id.in_(owned)
        )
        names = tuple(
            conn.execute(
                sa.select(adapters_table.c.name)
                .where(adapters_table.c.tenant == tenant)
                .order_by(adapters_table.c.name)
            ).scalars()
        )
        digests = set(
            conn.execute(
                sa.select(versions_table.c.digest).where(versions_table.c.adapter_id.in_(owned))
            ).scalars()
        )
        # Every table of the catalog's schema that points at an adapter or a version
        # (aliases, and whatever later features add), dependents first; explicit, as
        # SQLite enforces ON DELETE only on connections that enabled foreign keys.
        for table in reversed(metadata.sorted_tables):
            for key in table.foreign_keys:
                if key.column is adapters_table.c.id and table is not versions_table:
                    conn.execute(table.delete().where(key.parent.in_(owned)))
                elif key.column is versions_table.c.id:
                    conn.execute(table.delete().where(key.parent.in_(owned_versions)))
        conn.execute(versions_table.delete().where(versions_table.c.adapter_id.in_(owned)))
        conn.execute(adapters_table.delete().where(adapters_table.c.tenant == tenant))
        # Content-identical versions of other tenants share a blob: those blobs stay.
        still_used = set(
            conn.execute(
                sa.select(versions_table.c.digest).where(versions_table.c.digest.in_(digests))
            ).scalars()
        )
        return TenantAdaptersDeleted(names, tuple(sorted(digests - still_used)))

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _lock_adapter(conn: sa.Connection, name: str) -> None:
        """Hold the adapter's row until the transaction ends, so changes to one adapter take
        turns and each reads what the one before it wrote. PostgreSQL runs transactions side
        by side: without it two writers of a new alias both insert it (a primary-key error)
        and of 8 concurrent publishes 2 ran out of retries (measured).

        The lock is a write that changes nothing: a row lock on PostgreSQL, the database's
        write lock on SQLite, where SELECT ... FOR UPDATE is a plain SELECT that Python's
        driver does not even run inside the transaction."""
        conn.execute(
            adapters_table.update()
            .where(adapters_table.c.name == name)
            .values(last_number=adapters_table.c.last_number)
        )

    @classmethod
    def _locked_adapter_id(cls, conn: sa.Connection, name: str) -> int:
        cls._lock_adapter(conn, name)
        row = conn.execute(
            sa.select(adapters_table.c.id).where(adapters_table.c.name == name)
        ).first()
        if row is None:
            raise UnknownAdapter(f"adapter {name} is not in the registry")
        return row.id

    @staticmethod
    def _alias_version(conn: sa.Connection, adapter_id: int, alias: str) -> Any:
        return conn.execute(
            sa.select(*_VERSION_COLUMNS)
            .join(adapters_table, adapters_table.c.id == versions_table.c.adapter_id)
            .join(aliases_table, aliases_table.c.version_id == versions_table.c.id)
            .where(aliases_table.c.adapter_id == adapter_id, aliases_table.c.alias == alias)
        ).first()

    @staticmethod
    def _set_alias(
        conn: sa.Connection,
        adapter_id: int,
        alias: str,
        version_row_id: int,
        guard: str | None = None,
    ) -> None:
        """Point `alias` at one version; any split (and its counters) it had ends here."""
        rollout_state.clear_split(conn, adapter_id, alias)
        updated = conn.execute(
            aliases_table.update()
            .where(aliases_table.c.adapter_id == adapter_id, aliases_table.c.alias == alias)
            .values(version_id=version_row_id, updated_at=_now(), guard=guard)
        ).rowcount
        if not updated:
            conn.execute(
                aliases_table.insert().values(
                    adapter_id=adapter_id,
                    alias=alias,
                    version_id=version_row_id,
                    updated_at=_now(),
                    guard=guard,
                )
            )


# At the end: rollout_state reads this module's tables and types (a cycle both ways), and
# only Catalog's methods call it, after both modules are whole.
from loraplex.adapters import rollout_state  # noqa: E402
