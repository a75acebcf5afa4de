"""closing the loop: shadow and drift reports, alerts, per-deployment shadow/drift gates, row phases

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("gates", sa.Text, nullable=False, server_default="{}"))
    with op.batch_alter_table("deployment_devices") as batch:
        batch.add_column(sa.Column("phase", sa.String(16), nullable=True))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("drift", sa.Text, nullable=True))
        batch.add_column(sa.Column("shadow", sa.Text, nullable=True))
    op.create_table(
        "shadow_reports",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("active_version", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(16), nullable=False),
        sa.Column("compared", sa.BigInteger, nullable=False),
        sa.Column("disagreements", sa.BigInteger, nullable=False),
        sa.Column("dropped", sa.BigInteger, nullable=False),
        sa.Column("p50_ms", sa.Float),
        sa.Column("p95_ms", sa.Float),
        sa.Column("active_p95_ms", sa.Float),
    )
    op.create_index("ix_shadow_reports_model_version", "shadow_reports", ["model", "version", "received_at"])
    op.create_table(
        "drift_reports",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("psi", sa.Float, nullable=False),
        sa.Column("input", sa.String(128), nullable=False),
        sa.Column("channel", sa.Integer),
        sa.Column("samples", sa.Integer, nullable=False),
    )
    op.create_index("ix_drift_reports_device", "drift_reports", ["device_id", "received_at"])
    op.create_table(
        "captures",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("cmd_id", sa.String(64), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("max_bytes", sa.BigInteger, nullable=False),
        sa.Column("size", sa.BigInteger),
        sa.Column("artifact_key", sa.String(256)),
        sa.Column("requested_at", sa.Float, nullable=False),
        sa.Column("uploaded_at", sa.Float),
    )
    op.create_table(
        "alerts",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(256), nullable=False, unique=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64)),
        sa.Column("deployment_id", sa.String(32)),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("first_at", sa.Float, nullable=False),
        sa.Column("last_at", sa.Float, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("alerts")
    op.drop_table("captures")
    op.drop_table("drift_reports")
    op.drop_table("shadow_reports")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("shadow")
        batch.drop_column("drift")
    with op.batch_alter_table("deployment_devices") as batch:
        batch.drop_column("phase")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("gates")
