"""Alembic migrations of the queue's schema; `previewd.queue.migrate` runs them."""
