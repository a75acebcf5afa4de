"""deployment_devices: download tokens kept as sha256 hashes, with the previous one and an issue time;
devices.cert_serial and revoked_certs for client certificates

Revision ID: 0006
Revises: 0005
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployment_devices") as batch:
        batch.add_column(sa.Column("token_prev", sa.String(64), nullable=True))
        batch.add_column(sa.Column("token_issued_at", sa.Float, nullable=True))
        batch.create_index("ix_deployment_devices_token_prev", ["token_prev"])
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("cert_serial", sa.String(40), nullable=True))
    op.create_table("revoked_certs", sa.Column("serial", sa.String(40), primary_key=True),
                    sa.Column("device_id", sa.String(64), nullable=False), sa.Column("revoked_at", sa.Float, nullable=False))
    conn = op.get_bind()
    t = sa.table("deployment_devices", sa.column("id"), sa.column("token"), sa.column("sent_at"), sa.column("token_issued_at"))
    # Tokens stored in clear before this revision become their hashes: they keep working, and the database stops granting them.
    for row in conn.execute(sa.select(t.c.id, t.c.token, t.c.sent_at).where(t.c.token.is_not(None))).all():
        conn.execute(sa.update(t).where(t.c.id == row.id).values(
            token=hashlib.sha256(row.token.encode()).hexdigest(), token_issued_at=row.sent_at))


def downgrade() -> None:
    op.drop_table("revoked_certs")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("cert_serial")
    with op.batch_alter_table("deployment_devices") as batch:
        batch.drop_index("ix_deployment_devices_token_prev")
        batch.drop_column("token_issued_at")
        batch.drop_column("token_prev")
