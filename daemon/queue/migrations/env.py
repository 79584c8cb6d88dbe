"""Alembic's environment for the queue. `previewd.queue.migrate` runs it on a connection that
already holds the migration lock inside its transaction, so every revision and the version
stamp commit together, or not at all."""

from alembic import context

from previewd.queue.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the queue's migrations with `previewd db upgrade`: it passes the locked connection")
# Batch mode lets later revisions alter SQLite tables (ALTER TABLE there cannot change columns).
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
