"""Tables of the job queue (SQLAlchemy Core). The same schema serves SQLite and PostgreSQL.

Only `previewd.queue.store` reads or writes them. This is the schema at the newest migration
(`previewd.queue.migrations`); a change here needs a new revision there, and the migration tests
check that the two agree.
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa

from previewd.queue.states import JobState


class UTCDateTime(sa.TypeDecorator):
    """Aware UTC datetimes in Python on every backend.

    SQLite has no time zone type and SQLAlchemy stores its datetimes as naive ISO strings, which
    compare correctly only if every value is in the same zone: everything is stored as UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the queue stores aware UTC times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def state_type(check_name: str) -> sa.Enum:
    """A JobState stored as its value, checked by a constraint named `check_name`.

    Names are per column: PostgreSQL rejects two CHECK constraints of one name in a table.
    """
    return sa.Enum(JobState, name=check_name, native_enum=False, create_constraint=True,
                   length=16, values_callable=lambda states: [s.value for s in states])


metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(64), nullable=False, unique=True,
              comment="idempotency key: one job per render, whatever its state"),
    sa.Column("state", state_type("ck_jobs_state"), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("model", sa.String(64), nullable=False,
              comment="claims prefer the model a worker has loaded"),
    sa.Column("affinity", sa.String(128), nullable=True,
              comment="e.g. LoRA content hash, so consecutive jobs reuse a loaded LoRA"),
    sa.Column("group", sa.String(1024), nullable=False, comment="e.g. output folder"),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("worker_id", sa.String(128), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    sa.Column("run_after", UTCDateTime, nullable=True, comment="retry backoff"),
    sa.Column("progress", sa.Float, nullable=True),
    sa.Column("phase", sa.String(32), nullable=True,
              comment="what the running job is doing; NULL before its first report"),
    sa.Column("step", sa.Integer, nullable=True, comment="denoising step done"),
    sa.Column("steps", sa.Integer, nullable=True, comment="denoising steps in all"),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("result", sa.JSON, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Index("ix_jobs_claim", "state", "priority", "id"),
    sa.Index("ix_jobs_group", "group", "id"),
    # Ids are never reused after a delete, so "id asc" stays enqueue order (huey's strict_fifo).
    sqlite_autoincrement=True,
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("from_state", state_type("ck_job_events_from_state"), nullable=True,
              comment="NULL for the enqueue event"),
    sa.Column("to_state", state_type("ck_job_events_to_state"), nullable=False),
    sa.Column("worker_id", sa.String(128), nullable=True),
    sa.Column("message", sa.Text, nullable=True),
    sqlite_autoincrement=True,
)

# Advisory: a job's lease, not this table, decides who owns it, so jobs.worker_id has no
# foreign key here and a worker may claim before (or without) registering.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("last_heartbeat", UTCDateTime, nullable=False),
    sa.Column("current_job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="SET NULL"),
              nullable=True),
    sa.Column("device", sa.String(64), nullable=True, comment="as configured, e.g. cuda:1"),
    sa.Column("model", sa.String(64), nullable=True, comment="the model it has loaded"),
    sa.Column("gone_at", UTCDateTime, nullable=True,
              comment="set once it missed heartbeats for a lease period; NULL while live"),
    sa.Column("probe", sa.String(1024), nullable=True,
              comment="a file it wrote in the shared state folder, for the others to read"),
)

# A worker that cannot read a job's files (checkpoint snapshot, control image) gives the job
# back and skips it until `until`, so workers that can read them take it, and it is checked again
# later (a mount may come back) without the worker claiming it over and over meanwhile.
job_unreadable = sa.Table(
    "job_unreadable",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("worker_id", sa.String(128), primary_key=True),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("path", sa.Text, nullable=False, comment="the first file it could not read"),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("until", UTCDateTime, nullable=False),
)
