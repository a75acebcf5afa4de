"""deployments.on_no_data: what a gate does when a wave reported no requests (fail after the timeout, or pass);
devices.telemetry_interval_s: the interval a device was enrolled with, for the staleness rule

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("on_no_data", sa.String(8), nullable=False, server_default="fail"))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("telemetry_interval_s", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("telemetry_interval_s")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("on_no_data")
