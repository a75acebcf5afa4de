"""deployments.p95_floor_ms: latency rises below this many ms never fail the p95 gate

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("p95_floor_ms", sa.Float, nullable=False, server_default="1.0"))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("p95_floor_ms")
