"""registry: adapters, their immutable versions, and aliases

Revision ID: registry_0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "registry_0001"
down_revision = None
branch_labels = ("registry",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_adapters",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(129), nullable=False, unique=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("last_number", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "registry_versions",
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
    op.create_table(
        "registry_aliases",
        sa.Column(
            "adapter_id",
            sa.Integer,
            sa.ForeignKey("registry_adapters.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column(
            "version_id",
            sa.Integer,
            sa.ForeignKey("registry_versions.id", ondelete="RESTRICT"),
            nullable=False,
        ),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_aliases")
    op.drop_table("registry_versions")
    op.drop_table("registry_adapters")
