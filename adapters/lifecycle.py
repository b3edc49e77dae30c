"""An adapter's entry in the catalog ends with its last version; its numbers do not.

The rule: deleting an adapter's last version removes the adapter from the catalog
(its aliases go with it), so the name is free again and a local adapter folder of the
same name, which the registry entry shadowed, is served again. The highest version
number it reached is kept in `registry_retired_adapters`: publishing the name again
continues at the next number (`:v3` is never reused for other weights, as with any
deleted version). An entry left empty by an older loraplex is removed the same way
(`loraplex adapters delete tenant/name`).
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from loraplex.adapters.catalog import (
    Catalog,
    CatalogConflict,
    UnknownAdapter,
    adapters_table,
    metadata,
    versions_table,
)
from loraplex.adapters.names import AdapterName

# On the catalog's metadata: one schema (registry branch, migration registry_0003).
retired_adapters_table = sa.Table(
    "registry_retired_adapters",
    metadata,
    sa.Column("name", sa.String(129), primary_key=True),
    sa.Column("last_number", sa.Integer, nullable=False),
    sa.Column("removed_at", sa.DateTime, nullable=False),
)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def remove_if_empty(catalog: Catalog, name: AdapterName) -> bool:
    """Remove `name` from the catalog when it has no version left; True when removed.

    One transaction under the adapter's lock, so a publish running at the same time
    either lands before (and the entry stays) or after (and starts from the kept number).
    """
    with catalog.engine.begin() as conn:
        Catalog._lock_adapter(conn, str(name))
        row = conn.execute(
            sa.select(adapters_table.c.id, adapters_table.c.last_number).where(
                adapters_table.c.name == str(name)
            )
        ).first()
        if row is None:
            return False
        left = conn.execute(
            sa.select(versions_table.c.id).where(versions_table.c.adapter_id == row.id).limit(1)
        ).first()
        if left is not None:
            return False
        conn.execute(
            retired_adapters_table.delete().where(retired_adapters_table.c.name == str(name))
        )
        conn.execute(
            retired_adapters_table.insert().values(
                name=str(name), last_number=row.last_number, removed_at=_now()
            )
        )
        # Aliases, weights, counters and events reference the adapter ON DELETE CASCADE.
        conn.execute(adapters_table.delete().where(adapters_table.c.id == row.id))
    return True


def remove_adapter(catalog: Catalog, name: AdapterName) -> None:
    """`adapters delete tenant/name`: remove an entry without versions (refused otherwise)."""
    if remove_if_empty(catalog, name):
        return
    if not catalog.exists(name):
        raise UnknownAdapter(f"adapter {name} is not in the registry")
    numbers = [
        f"v{v.number}"
        for adapter in catalog.list_adapters(name.tenant)
        if adapter.name == str(name)
        for v in adapter.versions
    ]
    raise CatalogConflict(
        f"{name} still has versions {', '.join(numbers)}; delete them one by one "
        f"(`loraplex adapters delete {name}:vN`): the entry goes with the last"
    )


def continue_numbering(catalog: Catalog, name: AdapterName) -> bool:
    """Before publishing `name`: if it was removed before, recreate its entry at the number
    it had reached (True), so the next version is not numbered from v1 again.

    The entry exists without a version until the publish adds one (milliseconds, after the
    upload): a request then is answered 404 "has no published version", and a publish that
    fails afterwards removes it again (`remove_if_empty`)."""
    try:
        with catalog.engine.begin() as conn:
            retired = conn.execute(
                sa.select(retired_adapters_table.c.last_number).where(
                    retired_adapters_table.c.name == str(name)
                )
            ).first()
            if retired is None:
                return False
            exists = conn.execute(
                sa.select(adapters_table.c.id).where(adapters_table.c.name == str(name))
            ).first()
            if exists is None:
                conn.execute(
                    adapters_table.insert().values(
                        name=str(name),
                        tenant=name.tenant,
                        last_number=retired.last_number,
                        created_at=_now(),
                    )
                )
            conn.execute(
                retired_adapters_table.delete().where(retired_adapters_table.c.name == str(name))
            )
    except IntegrityError:
        pass  # a concurrent publish of the name recreated the entry first
    return True
