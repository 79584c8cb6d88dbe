"""Notices a SQLite queue that was deleted or replaced under previewd.

A daemon that went on with a deleted database file (SQLite keeps writing the unlinked inode) or
that started afresh on an empty one would silently forget every job and re-render everything.
So the database carries an id (SQLite's `user_version`, which nothing else uses) and state_dir
remembers it (`queue.id`): at start-up a missing database, or one with another id, stops the
daemon with the reason, until `previewd db upgrade` adopts the database that is there now; while
running, the file's inode is compared once a second (`Watch`).

PostgreSQL needs none of this: a dropped database is an error its server reports.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url

from previewd.errors import PreviewdError

MARKER = "queue.id"


class DatabaseReplaced(PreviewdError):
    """The queue database is not the one this state belongs to."""


def sqlite_file(db_url: str) -> Path | None:
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def check_before_connect(db_url: str, state_dir: Path) -> None:
    """Refuse to start when the database file is gone but state_dir remembers one."""
    db = sqlite_file(db_url)
    if db is not None and not db.exists() and (Path(state_dir) / MARKER).exists():
        raise DatabaseReplaced(
            f"{db}: the queue database is missing, but {state_dir} holds the state of the daemon that used it "
            f"(snapshots, {MARKER}): restore the database file, or run `previewd db upgrade -c CONFIG` to start "
            f"a new, empty queue (previews already written are then rendered again)")


def _database_id(db: Path) -> int:
    """The database's id, given one now if it has none (once, under SQLite's write lock)."""
    with sqlite3.connect(db, timeout=30, isolation_level=None) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (found,) = conn.execute("PRAGMA user_version").fetchone()
            if not found:
                found = secrets.randbelow(2**31 - 1) + 1
                conn.execute(f"PRAGMA user_version = {int(found)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    conn.close()
    return int(found)


def check_after_connect(db_url: str, state_dir: Path, *, adopt: bool = False) -> tuple[int, int] | None:
    """Match the database with the id state_dir remembers (`adopt`: remember this one); returns
    the file's (st_dev, st_ino) to watch, None for a database that is not a SQLite file."""
    db = sqlite_file(db_url)
    if db is None:
        return None
    marker = Path(state_dir) / MARKER
    found = _database_id(db)
    remembered = marker.read_text().strip() if marker.is_file() else None
    if remembered is not None and remembered != str(found) and not adopt:
        raise DatabaseReplaced(
            f"{db}: not the queue database this state belongs to (it was replaced or created afresh; {marker} "
            f"remembers another): restore the right file, or run `previewd db upgrade -c CONFIG` to adopt this "
            f"one (previews already written may then be rendered again)")
    if remembered != str(found):
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{MARKER}.{os.getpid()}.tmp")
        tmp.write_text(f"{found}\n")
        os.replace(tmp, marker)
    st = os.stat(db)
    return st.st_dev, st.st_ino


def still_there(db_url: str, identity: tuple[int, int] | None) -> str | None:
    """None while the database file is the one opened at start; else what happened to it."""
    db = sqlite_file(db_url)
    if db is None or identity is None:
        return None
    try:
        st = os.stat(db)
    except FileNotFoundError:
        return f"{db}: the queue database was deleted"
    if (st.st_dev, st.st_ino) != identity:
        return f"{db}: the queue database was replaced by another file"
    return None
