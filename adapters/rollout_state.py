"""The catalog's rollout rows: weighted aliases' splits, guard counters shared by every
router replica, and alias events (automatic rollbacks).

Functions on a connection inside the caller's transaction; the Catalog (catalog.py)
opens the transaction and holds the adapter's lock, so replicas adding their counts at
once take turns and each sees the sums the one before it wrote.

Counters: each version of a guarded split keeps its current run of requests and the
previous complete run. When a version's run reaches `min_requests` it is closed: a
canary is judged on exactly that run (its last N requests), against the incumbent's
previous + current runs (its last N to 2N), then the run starts again from zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from loraplex.adapters.catalog import (
    AliasEvent,
    CatalogConflict,
    alias_events_table,
    alias_weights_table,
    aliases_table,
    rollout_counts_table,
    versions_table,
)
from loraplex.adapters.splits import format_weights, parse_guard

ROLLBACK = "rollback"
EVENTS_LISTED = 20
"""Newest events per adapter that `adapters list` shows."""


def current_weights(conn: sa.Connection, adapter_id: int, alias: str) -> dict[int, int] | None:
    """The alias's weights now ({vN: 100} for one version), None when it does not exist."""
    split = conn.execute(
        sa.select(versions_table.c.number, alias_weights_table.c.weight)
        .join(versions_table, versions_table.c.id == alias_weights_table.c.version_id)
        .where(alias_weights_table.c.adapter_id == adapter_id, alias_weights_table.c.alias == alias)
    ).all()
    if split:
        return {row.number: row.weight for row in split}
    single = conn.execute(
        sa.select(versions_table.c.number)
        .join(aliases_table, aliases_table.c.version_id == versions_table.c.id)
        .where(aliases_table.c.adapter_id == adapter_id, aliases_table.c.alias == alias)
    ).first()
    return {single.number: 100} if single is not None else None


def write_split(conn: sa.Connection, adapter_id: int, alias: str, weights: dict[int, int]) -> None:
    """Weights by version row id (the alias row exists; clear_split ran)."""
    conn.execute(
        alias_weights_table.insert(),
        [
            {"adapter_id": adapter_id, "alias": alias, "version_id": vid, "weight": weight}
            for vid, weight in weights.items()
        ],
    )


def clear_split(conn: sa.Connection, adapter_id: int, alias: str) -> None:
    for table in (alias_weights_table, rollout_counts_table):
        conn.execute(table.delete().where(table.c.adapter_id == adapter_id, table.c.alias == alias))


def refuse_if_weighted(conn: sa.Connection, adapter_id: int, version_row_id: int, ref: str) -> None:
    """CatalogConflict when the version is part of a weighted alias."""
    aliases = (
        conn.execute(
            sa.select(alias_weights_table.c.alias).where(
                alias_weights_table.c.adapter_id == adapter_id,
                alias_weights_table.c.version_id == version_row_id,
            )
        )
        .scalars()
        .all()
    )
    if not aliases:
        return
    alias = sorted(aliases)[0]
    weights = current_weights(conn, adapter_id, alias) or {}
    name = ref.partition(":")[0]
    rest = {n: w for n, w in weights.items() if f"{name}:v{n}" != ref}
    hint = f" --to v{max(rest, key=lambda n: rest[n])}" if rest else ""
    raise CatalogConflict(
        f"{ref} is in the weighted alias @{alias} ({format_weights(weights)}): a split must "
        "keep versions that exist, so move the alias off it first "
        f"(`loraplex adapters alias {name} {alias}{hint}`)"
    )


def splits_of(
    conn: sa.Connection, adapter_ids: Sequence[int]
) -> dict[int, tuple[dict[str, dict[int, int]], dict[str, str]]]:
    """adapter id → (alias → {version: weight} of weighted aliases, alias → guard)."""
    result: dict[int, tuple[dict[str, dict[int, int]], dict[str, str]]] = {}
    rows = conn.execute(
        sa.select(
            alias_weights_table.c.adapter_id,
            alias_weights_table.c.alias,
            versions_table.c.number,
            alias_weights_table.c.weight,
        )
        .join(versions_table, versions_table.c.id == alias_weights_table.c.version_id)
        .where(alias_weights_table.c.adapter_id.in_(adapter_ids))
        .order_by(alias_weights_table.c.alias, versions_table.c.number)
    ).all()
    for row in rows:
        weights, _ = result.setdefault(row.adapter_id, ({}, {}))
        weights.setdefault(row.alias, {})[row.number] = row.weight
    guards = conn.execute(
        sa.select(aliases_table.c.adapter_id, aliases_table.c.alias, aliases_table.c.guard).where(
            aliases_table.c.adapter_id.in_(adapter_ids), aliases_table.c.guard.is_not(None)
        )
    ).all()
    for row in guards:
        result.setdefault(row.adapter_id, ({}, {}))[1][row.alias] = row.guard
    return result


def events_of(conn: sa.Connection, adapter_ids: Sequence[int]) -> dict[int, list[AliasEvent]]:
    rows = conn.execute(
        sa.select(alias_events_table)
        .where(alias_events_table.c.adapter_id.in_(adapter_ids))
        .order_by(alias_events_table.c.id.desc())
    ).all()
    result: dict[int, list[AliasEvent]] = {}
    for row in rows:
        listed = result.setdefault(row.adapter_id, [])
        if len(listed) < EVENTS_LISTED:
            listed.append(AliasEvent(row.alias, row.at, row.kind, row.detail))
    return result


def record_outcomes(
    conn: sa.Connection,
    adapter_id: int,
    name: str,
    alias: str,
    generation: datetime,
    outcomes: dict[int, tuple[int, int]],
    now: datetime,
) -> AliasEvent | None:
    """Add (requests, server errors) per version number; roll back when the guard trips."""
    alias_row = conn.execute(
        sa.select(
            aliases_table.c.version_id, aliases_table.c.guard, aliases_table.c.updated_at
        ).where(aliases_table.c.adapter_id == adapter_id, aliases_table.c.alias == alias)
    ).first()
    if alias_row is None or alias_row.guard is None or alias_row.updated_at != generation:
        return None  # unguarded, or counted under a setting that has since changed
    guard = parse_guard(alias_row.guard)
    split = conn.execute(
        sa.select(versions_table.c.id, versions_table.c.number, alias_weights_table.c.weight)
        .join(versions_table, versions_table.c.id == alias_weights_table.c.version_id)
        .where(alias_weights_table.c.adapter_id == adapter_id, alias_weights_table.c.alias == alias)
    ).all()
    ids = {row.number: row.id for row in split}
    numbers = {row.id: row.number for row in split}
    counts = {
        row.version_id: row
        for row in conn.execute(
            sa.select(rollout_counts_table).where(
                rollout_counts_table.c.adapter_id == adapter_id,
                rollout_counts_table.c.alias == alias,
            )
        ).all()
    }
    windows: dict[int, tuple[int, int]] = {}  # version id → incumbent-style window
    judged: dict[int, tuple[int, int]] = {}  # version id → a closed run of min_requests
    for number, (requests, errors) in outcomes.items():
        vid = ids.get(number)
        if vid is None:
            continue
        row = counts.get(vid)
        current = (requests + (row.requests if row else 0), errors + (row.errors if row else 0))
        previous = (row.prev_requests, row.prev_errors) if row else (0, 0)
        if current[0] >= guard.min_requests:
            judged[vid] = current
            previous, current = current, (0, 0)
        values = {
            "requests": current[0],
            "errors": current[1],
            "prev_requests": previous[0],
            "prev_errors": previous[1],
        }
        if row is None:
            conn.execute(
                rollout_counts_table.insert().values(
                    adapter_id=adapter_id, alias=alias, version_id=vid, **values
                )
            )
        else:
            conn.execute(
                rollout_counts_table.update()
                .where(
                    rollout_counts_table.c.adapter_id == adapter_id,
                    rollout_counts_table.c.alias == alias,
                    rollout_counts_table.c.version_id == vid,
                )
                .values(**values)
            )
        windows[vid] = (current[0] + previous[0], current[1] + previous[1])
    incumbent = alias_row.version_id
    if incumbent not in windows:
        row = counts.get(incumbent)
        windows[incumbent] = _window(row)
    for vid, run in judged.items():
        if vid != incumbent and guard.tripped(run, windows[incumbent]):
            return _roll_back(
                conn,
                adapter_id,
                name,
                alias,
                {row.number: row.weight for row in split},
                (numbers[vid], run),
                (numbers[incumbent], windows[incumbent]),
                str(guard),
                now,
            )
    return None


def _window(row: Any) -> tuple[int, int]:
    if row is None:
        return (0, 0)
    return (row.requests + row.prev_requests, row.errors + row.prev_errors)


def _roll_back(
    conn: sa.Connection,
    adapter_id: int,
    name: str,
    alias: str,
    weights: dict[int, int],
    canary: tuple[int, tuple[int, int]],
    incumbent: tuple[int, tuple[int, int]],
    guard: str,
    now: datetime,
) -> AliasEvent:
    (canary_number, (c_requests, c_errors)) = canary
    (incumbent_number, (i_requests, i_errors)) = incumbent
    i_rate = i_errors / i_requests if i_requests else 0.0
    detail = (
        f"{name}@{alias} rolled back to v{incumbent_number} (was {format_weights(weights)}): "
        f"canary v{canary_number} server-error rate {c_errors / c_requests:.1%} "
        f"({c_errors}/{c_requests}) vs incumbent v{incumbent_number} {i_rate:.1%} "
        f"({i_errors}/{i_requests}), guard {guard}"
    )
    clear_split(conn, adapter_id, alias)
    # The alias row already points at the incumbent; a new generation ends any counting
    # still under way on other replicas, and the guard goes with the split it watched.
    conn.execute(
        aliases_table.update()
        .where(aliases_table.c.adapter_id == adapter_id, aliases_table.c.alias == alias)
        .values(updated_at=now, guard=None)
    )
    conn.execute(
        alias_events_table.insert().values(
            adapter_id=adapter_id, alias=alias, at=now, kind=ROLLBACK, detail=detail
        )
    )
    return AliasEvent(alias, now, ROLLBACK, detail)
