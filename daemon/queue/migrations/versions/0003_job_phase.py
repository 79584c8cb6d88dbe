"""What a running job is doing: its phase (loading, encoding, denoising, decoding, writing) and,
while denoising, step k of n, for `previewd status`.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns: plain ALTER TABLE ADD COLUMN on both backends; existing rows keep theirs.
    op.add_column("jobs", sa.Column("phase", sa.String(32), nullable=True,
                                    comment="what the running job is doing; NULL before its first report"))
    op.add_column("jobs", sa.Column("step", sa.Integer, nullable=True, comment="denoising step done"))
    op.add_column("jobs", sa.Column("steps", sa.Integer, nullable=True, comment="denoising steps in all"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in ("steps", "step", "phase"):
            batch.drop_column(column)
