"""registry: quality gate decisions and served evaluations per version; retired adapter names

`registry_version_quality` holds, per version, the publish gate's decision (the scores
it compared, and who forced a publish the gate refused) and the held-out scores
measured through a running server (`loraplex adapters eval --record`), beside the
training-time scores in the version's manifest. `registry_retired_adapters` remembers
the last version number of an adapter whose last version was deleted (the entry is
removed, so a local folder of that name is served again): publishing the name again
continues at the next number, so `:vN` never names two different adapters.

Revision ID: registry_0003
Revises: registry_0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "registry_0003"
down_revision = "registry_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_version_quality",
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
    op.create_table(
        "registry_retired_adapters",
        sa.Column("name", sa.String(129), primary_key=True),
        sa.Column("last_number", sa.Integer, nullable=False),
        sa.Column("removed_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_retired_adapters")
    op.drop_table("registry_version_quality")
