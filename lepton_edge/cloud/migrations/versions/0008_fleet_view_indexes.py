"""indexes for the web page at fleet scale: a device's telemetry over time, the fleet filtered by profile

Without ``telemetry(device_id, received_at)`` the Device page scans every telemetry row
of the fleet (10,000 devices at a 10 s interval add 3.6 million an hour).

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_telemetry_device_received", "telemetry", ["device_id", "received_at"])
    op.create_index("ix_devices_profile", "devices", ["profile", "device_id"])


def downgrade() -> None:
    op.drop_index("ix_devices_profile", table_name="devices")
    op.drop_index("ix_telemetry_device_received", table_name="telemetry")
