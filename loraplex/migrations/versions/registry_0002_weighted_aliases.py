"""registry: weighted aliases (canary splits), rollback guards, their shared counters and events

An alias keeps pointing at one version (`registry_aliases.version_id`, the incumbent);
a weighted alias also has one row per version in `registry_alias_weights` (integer
weights summing to 100). A guarded alias (`guard`, e.g. `error_rate<=2x,min_requests=200`)
has its per-version outcome counters in `registry_rollout_counts`, which every router
replica adds to, and each automatic rollback leaves a row in `registry_alias_events`.

Revision ID: registry_0002
Revises: registry_0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "registry_0002"
down_revision = "registry_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("registry_aliases") as batch:
        batch.add_column(sa.Column("guard", sa.String(200), nullable=True))
    op.create_table(
        "registry_alias_weights",
        sa.Column(
            "adapter_id",
            sa.Integer,
            sa.ForeignKey("registry_adapters.id", ondelete="CASCADE"),
            primary_key=True,
        ),
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
    op.create_table(
        "registry_rollout_counts",
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
            sa.ForeignKey("registry_versions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
        sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
        sa.Column("prev_requests", sa.Integer, nullable=False, server_default="0"),
        sa.Column("prev_errors", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "registry_alias_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "adapter_id",
            sa.Integer,
            sa.ForeignKey("registry_adapters.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(1000), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_alias_events")
    op.drop_table("registry_rollout_counts")
    op.drop_table("registry_alias_weights")
    with op.batch_alter_table("registry_aliases") as batch:
        batch.drop_column("guard")
