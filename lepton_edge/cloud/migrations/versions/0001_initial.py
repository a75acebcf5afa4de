"""initial schema: registry, fleet, telemetry, events, rollouts, leases

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table("settings", sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text, nullable=False))
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_models_name_version"),
    )
    op.create_table(
        "bundles",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("precision", sa.String(32), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("artifact_key", sa.String(256), nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("signed_by", sa.String(32)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("model_id", "profile", name="uq_bundles_model_profile"),
    )
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("enrolled_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_ts", sa.Float),
        sa.Column("agent_version", sa.String(32)),
        sa.Column("active", sa.Text, nullable=False),
        sa.Column("last_seen", sa.Float),
        sa.Column("p95_ms", sa.Float),
        sa.Column("error_rate", sa.Float),
        sa.Column("telemetry_seq", sa.BigInteger),
    )
    op.create_table(
        "telemetry",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("p95_ms", sa.Float),
    )
    op.create_index("ix_telemetry_model_version", "telemetry", ["model", "version", "received_at"])
    op.create_table(
        "events",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("cmd_id", sa.String(64)),
        sa.Column("deployment_id", sa.String(64)),
        sa.Column("model", sa.String(128)),
        sa.Column("version", sa.String(64)),
        sa.Column("detail", sa.Text, nullable=False),
        sa.UniqueConstraint("device_id", "event_id", name="uq_events_device_event"),
    )
    op.create_index("ix_events_cmd", "events", ["cmd_id"])
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("selectors", sa.Text, nullable=False),
        sa.Column("waves", sa.Text, nullable=False),
        sa.Column("soak_s", sa.Float, nullable=False),
        sa.Column("timeout_s", sa.Float, nullable=False),
        sa.Column("max_error_rate", sa.Float, nullable=False),
        sa.Column("max_p95_regression", sa.Float, nullable=False),
        sa.Column("min_healthy", sa.Float, nullable=False),
        sa.Column("on_failure", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_wave", sa.Integer, nullable=False),
        sa.Column("wave_started_at", sa.Float),
        sa.Column("soak_started_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("wave_results", sa.Text, nullable=False),
    )
    op.create_table(
        "deployment_devices",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("deployment_id", sa.String(32), sa.ForeignKey("deployments.id"), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("bundle_id", sa.String(32)),
        sa.Column("cmd_id", sa.String(64)),
        sa.Column("token", sa.String(64)),
        sa.Column("previous_version", sa.String(64)),
        sa.Column("sent_at", sa.Float),
        sa.Column("activated_at", sa.Float),
        sa.Column("rollback_cmd_id", sa.String(64)),
        sa.Column("rollback_sent_at", sa.Float),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("last_event", sa.String(32)),
        sa.Column("detail", sa.Text, nullable=False),
        sa.UniqueConstraint("deployment_id", "device_id", name="uq_deployment_devices"),
    )
    op.create_index("ix_deployment_devices_token", "deployment_devices", ["token"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128)),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for name in ("leases", "deployment_devices", "deployments", "events", "telemetry", "devices", "bundles", "models", "settings"):
        op.drop_table(name)
