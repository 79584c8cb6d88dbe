"""The test PostgreSQL server (PREVIEWD_TEST_PG_URL, started by .ci/postgres.sh): a fresh database
per test, and stopping/starting the server for the tests that outlive a restart."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

PG_URL = os.environ.get("PREVIEWD_TEST_PG_URL")
CONTROL = Path(__file__).resolve().parents[1] / ".ci" / "pg_ctl"


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the test server; its URL. Dropped afterwards."""
    name = f"previewd_test_{uuid.uuid4().hex[:12]}"
    # No pool: a test may restart the server in between.
    server = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with server.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()


def control(action: str) -> subprocess.CompletedProcess:
    """`.ci/pg_ctl ACTION` on the test server: stop, start or status."""
    return subprocess.run([str(CONTROL), action, PG_URL], capture_output=True, text=True, timeout=120)
