"""The queue as previewd 0.1 created it (before Alembic): jobs, their events, workers.

Databases of that layout are stamped with this revision (see `previewd.queue.migrate`), so the
tables here must stay exactly what 0.1's `metadata.create_all` made. Written out, not imported
from schema.py, which moves on with later revisions.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = "('queued', 'running', 'done', 'failed', 'cancelled')"


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(64), nullable=False, unique=True,
                  comment="idempotency key: one job per render, whatever its state"),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("model", sa.String(64), nullable=False,
                  comment="claims prefer the model a worker has loaded"),
        sa.Column("affinity", sa.String(128), nullable=True,
                  comment="e.g. LoRA content hash, so consecutive jobs reuse a loaded LoRA"),
        sa.Column("group", sa.String(1024), nullable=False, comment="e.g. output folder"),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_after", sa.DateTime(timezone=True), nullable=True, comment="retry backoff"),
        sa.Column("progress", sa.Float, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(f"state IN {STATES}", name="ck_jobs_state"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_jobs_group", "jobs", ["group", "id"])
    op.create_index("ix_jobs_claim", "jobs", ["state", "priority", "id"])
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True, comment="NULL for the enqueue event"),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("message", sa.Text, nullable=True),
        sa.CheckConstraint(f"from_state IN {STATES}", name="ck_job_events_from_state"),
        sa.CheckConstraint(f"to_state IN {STATES}", name="ck_job_events_to_state"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("current_job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="SET NULL"),
                  nullable=True),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("job_events")
    op.drop_table("jobs")
