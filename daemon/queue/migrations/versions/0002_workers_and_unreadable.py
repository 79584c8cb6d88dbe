"""Workers as first-class rows (device, loaded model, gone, shared-state probe) and per-worker
"cannot read this job's files" marks.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns: plain ALTER TABLE ADD COLUMN on both backends; existing rows keep theirs.
    op.add_column("workers", sa.Column("device", sa.String(64), nullable=True,
                                       comment="as configured, e.g. cuda:1"))
    op.add_column("workers", sa.Column("model", sa.String(64), nullable=True,
                                       comment="the model it has loaded"))
    op.add_column("workers", sa.Column("gone_at", sa.DateTime(timezone=True), nullable=True,
                                       comment="set once it missed heartbeats for a lease period; NULL while live"))
    op.add_column("workers", sa.Column("probe", sa.String(1024), nullable=True,
                                       comment="a file it wrote in the shared state folder, for the others to read"))
    op.create_table(
        "job_unreadable",
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("worker_id", sa.String(128), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("path", sa.Text, nullable=False, comment="the first file it could not read"),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_unreadable")
    with op.batch_alter_table("workers") as batch:
        for column in ("probe", "gone_at", "model", "device"):
            batch.drop_column(column)
