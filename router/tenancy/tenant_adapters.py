"""A tenant's registry adapters live and die with the tenant.

Deleting a tenant deletes its adapters (every version and alias) from the catalog in the
tenant's own transaction, then the blobs no other version uses: a tenant created later
under the same name starts with none, so it can neither list nor serve what the old one
published. Deleted, not archived: an archive would still hold the name (`tenant/name`
is unique) and the blobs, and nothing could ever serve it again.

Publishing needs the tenant to exist once tenancy is in use (any tenant exists): a typo
in `--name` would otherwise park an adapter under a tenant that a later `tenants create`
hands it to. `public/*` (shared adapters) needs no tenant; with no tenant at all (open
loopback mode) names are plain namespaces, as before tenants are set up.

Here, not in adapters/: the registry knows nothing of tenants (it imports nothing from
the router); this layer sees both and is used by the CLI and the admin API alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from loraplex.adapters.blob_store import BlobStore, StoreUnavailable
from loraplex.adapters.catalog import Catalog, TenantAdaptersDeleted
from loraplex.adapters.names import AdapterName
from loraplex.router.tenancy.auth import SHARED_OWNER
from loraplex.router.tenancy.store import NotFound, TenancyStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TenantDeleted:
    tenant: str
    adapters: tuple[str, ...]
    """The registry adapters deleted with it."""
    blobs_left: tuple[str, ...]
    """Unreferenced blobs the store could not delete now (the catalog no longer names them,
    so they are never served; delete them from the store later)."""


def delete_tenant(
    store: TenancyStore, name: str, catalog: Catalog | None, blobs: BlobStore | None
) -> TenantDeleted:
    """Delete the tenant, its keys, quotas and registry adapters (one transaction: the
    catalog is in the same database), then the blobs only its adapters used. Raises
    NotFound naming the tenant."""
    if catalog is None:
        store.delete_tenant(name)
        return TenantDeleted(name, (), ())
    deleted: TenantAdaptersDeleted | None = store.delete_tenant(
        name, lambda conn: catalog.delete_tenant_adapters(name, conn)
    )
    assert deleted is not None
    left = []
    # After the commit: a failure here leaves an unreferenced blob, never a served adapter
    # without its files (the order Registry.delete_version keeps too).
    for digest in deleted.unreferenced_digests if blobs is not None else ():
        try:
            blobs.delete(digest)
        except (StoreUnavailable, OSError) as exc:
            log.error(
                "could not delete a blob of a deleted tenant",
                extra={"digest": digest, "error": repr(exc)},
            )
            left.append(digest)
    if blobs is None:
        left = list(deleted.unreferenced_digests)
    return TenantDeleted(name, deleted.adapters, tuple(left))


def require_publish_tenant(store: TenancyStore, name: AdapterName) -> None:
    """Raises NotFound (field `tenant`) when `name` would be published for a tenant that does
    not exist while tenancy is in use."""
    tenant = name.tenant
    if tenant is None or tenant == SHARED_OWNER or not store.has_tenants():
        return
    try:
        store.require_tenant(tenant)
    except NotFound:
        raise NotFound(
            "tenant",
            f"no tenant named '{tenant}': create it first (`loraplex tenants create {tenant}`) "
            f"to publish {name}",
        ) from None
