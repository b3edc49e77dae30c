"""tenancy: tenants, API keys (hashed), quotas and their shared limiter state.

Times are epoch seconds (float): the quota arithmetic needs plain numbers, and
SQLite has no time zone aware timestamp type.

Revision ID: tenancy_0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "tenancy_0001"
down_revision = None
branch_labels = ("tenancy",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(32), nullable=False, unique=True),
        # NULL tenant = an admin key.
        sa.Column(
            "tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column("description", sa.String(200), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "quotas",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "tenant_id",
            sa.Integer,
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        # "" = every request of the tenant; otherwise one adapter name (`tenant/name`).
        sa.Column("adapter", sa.String(200), nullable=False, server_default=""),
        sa.Column("requests_per_minute", sa.Integer, nullable=True),
        sa.Column("tokens_per_minute", sa.Integer, nullable=True),
        sa.Column("max_concurrent", sa.Integer, nullable=True),
        # Limiter state (GCRA "theoretical arrival times"), shared by every router worker.
        sa.Column("request_tat", sa.Float, nullable=False, server_default="0"),
        sa.Column("token_tat", sa.Float, nullable=False, server_default="0"),
        sa.UniqueConstraint("tenant_id", "adapter", name="uq_quotas_tenant_adapter"),
    )
    op.create_table(
        "quota_leases",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "quota_id",
            sa.Integer,
            sa.ForeignKey("quotas.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("request_id", sa.String(128), nullable=False),
        # A worker that dies mid-request cannot release its slot: the lease lapses instead.
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_quota_leases_quota_id", "quota_leases", ["quota_id"])


def downgrade() -> None:
    op.drop_table("quota_leases")
    op.drop_table("quotas")
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
