"""What the catalog knows about a version's quality, beside its manifest's training-time scores.

Per version: the publish gate's decision (quality_gate.py; who forced a publish it
refused) and the held-out scores measured through a running server by
`loraplex adapters eval --record` (the path users get: vLLM, its dtype, the chat
template). Kept in `registry_version_quality` (migration registry_0003), removed with
the version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from loraplex.adapters.catalog import (
    Catalog,
    CatalogLookupError,
    adapters_table,
    metadata,
    versions_table,
)
from loraplex.adapters.names import AdapterName
from loraplex.adapters.quality_gate import GateDecision

# The newest served evaluations kept per version: enough to compare a few data files
# and engines, bounded so a scheduled eval cannot grow a row without end.
MAX_SERVED_EVALS = 20

version_quality_table = sa.Table(
    "registry_version_quality",
    metadata,
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("registry_versions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("gate", sa.JSON, nullable=True),
    sa.Column("forced_by", sa.String(128), nullable=True),
    sa.Column("served_evals", sa.JSON, nullable=True),
)


@dataclass(frozen=True)
class VersionQuality:
    number: int
    manifest_eval: dict[str, float]
    """The training-time held-out scores (manifest.json `eval`)."""
    gate: dict[str, Any] | None = None
    forced_by: str | None = None
    served_evals: list[dict[str, Any]] = field(default_factory=list)


def _version_row_id(conn: sa.Connection, name: AdapterName, number: int) -> int:
    row = conn.execute(
        sa.select(versions_table.c.id)
        .join(adapters_table, adapters_table.c.id == versions_table.c.adapter_id)
        .where(adapters_table.c.name == str(name), versions_table.c.number == number)
    ).first()
    if row is None:
        raise CatalogLookupError(f"adapter {name} has no version v{number}")
    return row.id


def _update(conn: sa.Connection, version_row_id: int, **values: Any) -> None:
    changed = conn.execute(
        version_quality_table.update()
        .where(version_quality_table.c.version_id == version_row_id)
        .values(**values)
    ).rowcount
    if not changed:
        conn.execute(version_quality_table.insert().values(version_id=version_row_id, **values))


def record_gate(catalog: Catalog, name: AdapterName, number: int, decision: GateDecision) -> None:
    """Store the gate's decision for `name:vN` (who forced it, when it was forced)."""
    with catalog.engine.begin() as conn:
        Catalog._lock_adapter(conn, str(name))  # writers of one adapter take turns
        _update(
            conn,
            _version_row_id(conn, name, number),
            gate=decision.to_json(),
            forced_by=decision.forced_by,
        )


def record_served_eval(
    catalog: Catalog, name: AdapterName, number: int, evaluation: dict[str, Any]
) -> None:
    """Add one served evaluation of `name:vN` (newest last; the oldest beyond
    MAX_SERVED_EVALS dropped)."""
    with catalog.engine.begin() as conn:
        Catalog._lock_adapter(conn, str(name))  # read-modify-write of the list
        row_id = _version_row_id(conn, name, number)
        existing = conn.execute(
            sa.select(version_quality_table.c.served_evals).where(
                version_quality_table.c.version_id == row_id
            )
        ).first()
        evals = list(existing.served_evals or []) if existing is not None else []
        evals = [*evals, evaluation][-MAX_SERVED_EVALS:]
        _update(conn, row_id, served_evals=evals)


def version_quality(catalog: Catalog, name: AdapterName) -> list[VersionQuality]:
    """Every version of `name`, oldest first, with its training-time and recorded scores."""
    with catalog.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                versions_table.c.number,
                versions_table.c.manifest,
                version_quality_table.c.gate,
                version_quality_table.c.forced_by,
                version_quality_table.c.served_evals,
            )
            .select_from(
                versions_table.join(
                    adapters_table, adapters_table.c.id == versions_table.c.adapter_id
                ).outerjoin(
                    version_quality_table,
                    version_quality_table.c.version_id == versions_table.c.id,
                )
            )
            .where(adapters_table.c.name == str(name))
            .order_by(versions_table.c.number)
        ).all()
    return [
        VersionQuality(
            row.number,
            dict((row.manifest or {}).get("eval") or {}),
            row.gate,
            row.forced_by,
            list(row.served_evals or []),
        )
        for row in rows
    ]
