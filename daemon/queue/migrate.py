"""Versions of the queue's schema (Alembic), applied under a lock.

Daemons started together (systemd after a reboot, one per GPU) all upgrade the schema at start-up:
each takes the database's lock first (PostgreSQL: a transaction-scoped advisory lock; SQLite: the
write lock of `BEGIN IMMEDIATE`) and reads the revision only once it holds it, so the first one
migrates and the others wait, then find the schema at head. DDL is transactional on both
backends, so a migration and its version stamp commit together or not at all.

A database made by previewd 0.1 (tables, no Alembic version) is adopted: stamped with the
revision that is exactly that layout, then upgraded, so no job is lost. A database stamped with a
revision this code does not know was migrated by a newer previewd: we refuse to touch it.

A schema change is a new file in `migrations/versions/` whose `down_revision` is the previous
head; tests/queue/test_migrations.py checks that head matches `schema.py`.
"""

from __future__ import annotations

import logging
from importlib import metadata as package_metadata

# Before Alembic is imported: at INFO it logs its plugins and the backend it found in every
# process; the daemon logs the migrations itself ("queue schema upgraded from ... to ...").
logging.getLogger("alembic").setLevel(logging.WARNING)

import sqlalchemy as sa  # noqa: E402
from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from alembic.util import CommandError  # noqa: E402
from sqlalchemy.engine import Connection  # noqa: E402

from previewd.queue.errors import SchemaVersionError  # noqa: E402

SCRIPT_LOCATION = "previewd.queue:migrations"
BASELINE = "0001"
"""The revision that is previewd 0.1's layout, made before the queue had versions."""

# Key of the advisory lock (any bigint agreed by all daemons): "prvw" in ASCII.
_LOCK_KEY = 0x70727677

# previewd 0.1's tables and columns, as its `metadata.create_all` made them.
_BASELINE_COLUMNS = {
    "jobs": {"id", "key", "state", "priority", "model", "affinity", "group", "payload", "attempts",
             "max_attempts", "worker_id", "lease_expires_at", "run_after", "progress", "last_error",
             "result", "created_at", "updated_at", "started_at", "finished_at"},
    "job_events": {"id", "job_id", "at", "from_state", "to_state", "worker_id", "message"},
    "workers": {"id", "hostname", "pid", "started_at", "last_heartbeat", "current_job_id"},
}


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration without an ini file; `connection` is what env.py migrates."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    """The revisions this code knows."""
    return ScriptDirectory.from_config(alembic_config())


def current(conn: Connection) -> str | None:
    """The database's revision; None for an empty database (or one of previewd 0.1)."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(conn: Connection) -> tuple[str | None, str]:
    """Bring the schema to head under the lock; returns (revision found, head), where a database
    of previewd 0.1 counts as found at BASELINE and an empty one as None.

    `conn` must be in a write transaction (on SQLite, one begun with BEGIN IMMEDIATE): the lock
    is held until it ends. Raises SchemaVersionError for a database this code cannot use.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    script = script_directory()
    target = script.get_current_head()
    context = MigrationContext.configure(conn)
    found = context.get_current_revision()
    if found is not None:
        check_known(script, found)
    elif _adopt_baseline(conn):
        context.stamp(script, BASELINE)
        found = BASELINE
    if found != target:
        command.upgrade(alembic_config(conn), "head")
    return found, target


def check_known(script: ScriptDirectory, revision: str) -> None:
    try:
        script.get_revision(revision)
    except CommandError:
        version = package_metadata.version("previewd")
        raise SchemaVersionError(
            f"the queue database's schema is at revision {revision}, which this previewd "
            f"({version}, schema {script.get_current_head()}) does not know: a newer previewd "
            f"upgraded it. Install that version here too.") from None


def _adopt_baseline(conn: Connection) -> bool:
    """True when the database holds previewd 0.1's tables (to be stamped), False when it holds
    none of them (to be created); SchemaVersionError for anything else."""
    inspector = sa.inspect(conn)
    present = set(inspector.get_table_names()) & set(_BASELINE_COLUMNS)
    if not present:
        return False
    problems = [f"table {name} is missing" for name in sorted(set(_BASELINE_COLUMNS) - present)]
    for name in sorted(present):
        columns = {column["name"] for column in inspector.get_columns(name)}
        if columns != _BASELINE_COLUMNS[name]:
            problems.append(f"table {name} has columns {', '.join(sorted(columns))}")
    if problems:
        raise SchemaVersionError("the database has queue tables without a schema version, but not "
                                 "previewd 0.1's layout (" + "; ".join(problems) + "): it is not a "
                                 "previewd queue, or was changed by hand")
    return True
