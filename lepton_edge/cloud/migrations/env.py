"""Alembic environment: the service passes its own connection, so no URL lives here."""

from alembic import context

from lepton_edge.cloud.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through lepton_edge.cloud.db.connect(), which passes a connection")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
