"""`JobStore`: the durable job queue, and the only module that writes SQL.

Delivery is at least once: a claimed job carries a lease that its worker extends with
`heartbeat`; when a worker vanishes, `requeue_expired` hands the job to another worker. A worker
learns that it lost a job (cancelled, or requeued and claimed elsewhere) when `heartbeat` returns
False, and its late `finish` raises `JobStateError`, so a job is recorded done exactly once.

SQLite (one host): WAL, a busy timeout and foreign keys are set on every connection, and write
transactions start with `BEGIN IMMEDIATE`, so a claim's read and its compare-and-set update run
under the database write lock. PostgreSQL (several hosts): the same statements, where the
claim's `FOR UPDATE SKIP LOCKED` lets concurrent claimers pass over each other's rows.
Payloads and results are opaque JSON objects.

Time is the database's: leases, retry delays and heartbeats are stamped with PostgreSQL's `now()`,
so a host whose clock is off neither steals live jobs nor keeps dead ones (SQLite runs inside
this process, so its clock is this host's). A lost connection raises `DatabaseUnavailable`, which
callers retry; stale pooled connections are replaced after a server restart (pre-ping).
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from previewd.errors import JobStateError
from previewd.queue import migrate
from previewd.queue.errors import DatabaseUnavailable
from previewd.queue.records import Job, JobEvent, Unreadable, Worker
from previewd.queue.schema import job_events, job_unreadable, jobs, workers
from previewd.queue.states import JobState

Clock = Callable[[], datetime]

QUEUED, RUNNING, DONE, FAILED, CANCELLED = (JobState.QUEUED, JobState.RUNNING, JobState.DONE,
                                            JobState.FAILED, JobState.CANCELLED)

# Execution option that makes the SQLite "begin" hook take the write lock up front.
_WRITE_OPTION = "previewd_write"

# libpq defaults wait minutes on a host that went away; a worker should notice within seconds.
_PG_CONNECT_ARGS = {"connect_timeout": 10, "keepalives_idle": 30, "keepalives_interval": 10,
                    "keepalives_count": 3}

# SQLite errors that are about access, not about the statement (vs e.g. "no such table").
_SQLITE_UNAVAILABLE = ("database is locked", "database is busy", "unable to open database",
                       "disk i/o error")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobStore:
    """The job queue on one database URL, e.g. ``sqlite:////var/lib/previewd/previewd.db``.

    Safe to share between threads. Each process needs its own store: create it after forking.
    `clock` replaces the database's clock (tests pass a fake one to move time); it must return
    aware datetimes. `busy_timeout` (SQLite) is how many seconds a writer waits for another
    process's write lock before `DatabaseUnavailable`.
    """

    def __init__(self, url: str, *, clock: Clock | None = None, busy_timeout: float = 30.0):
        self._clock = clock
        parsed = sa.make_url(url)
        connect_args = {}
        if parsed.get_backend_name() == "postgresql":
            connect_args = {k: v for k, v in _PG_CONNECT_ARGS.items() if k not in parsed.query}
        self._engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
        if self._engine.dialect.name == "sqlite":
            _configure_sqlite(self._engine, busy_timeout)
        self._writer = self._engine.execution_options(**{_WRITE_OPTION: True})

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def upgrade_schema(self) -> tuple[str | None, str]:
        """Create or migrate the schema to head under the database's lock; safe to call on every
        start, from any number of processes at once. Returns (revision found, head): equal when
        there was nothing to do; found is None for an empty database and `migrate.BASELINE` for
        one of previewd 0.1, adopted without losing a job. Raises SchemaVersionError when a newer previewd
        migrated the database past what this code knows."""
        if (path := _sqlite_path(self._engine.url)) is not None and not os.path.exists(path):
            try:
                sqlite3.connect(path).close()  # the one place a SQLite file is created (see _configure_sqlite)
            except sqlite3.OperationalError as exc:
                raise DatabaseUnavailable(f"database unreachable: {exc}") from exc
        with self._unavailable_as_error(), self._writer.begin() as conn:
            return migrate.upgrade(conn)

    def create_schema(self) -> None:
        """`upgrade_schema` for callers that only need the tables to exist (tests, tools)."""
        self.upgrade_schema()

    def schema_revision(self) -> str | None:
        """The database's schema revision; None for an empty database or one of previewd 0.1."""
        path = _sqlite_path(self._engine.url)
        if path is not None and not os.path.exists(path) and os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return None  # not created yet, and can be: as empty as it gets
        with self._read() as conn:
            return migrate.current(conn)

    def now(self) -> datetime:
        """The database's time (what leases and heartbeats are measured with)."""
        with self._read() as conn:
            return self._now(conn)

    # -- producers ---------------------------------------------------------------------------

    def enqueue(self, *, key: str, payload: dict, model: str, group: str,
                affinity: str | None = None, priority: int = 0,
                max_attempts: int = 3) -> tuple[Job, bool]:
        """Queue a job unless one with `key` exists in any state.

        Returns (job, True) for a new job, or (the existing job, False): a re-dropped file or a
        restart never renders the same thing twice.
        """
        if not 0 < len(key) <= 64:
            raise ValueError(f"`key` must be 1 to 64 characters, got {len(key)}")
        if max_attempts < 1:
            raise ValueError(f"`max_attempts` must be at least 1, got {max_attempts}")
        try:
            with self._write() as (conn, now):
                existing = conn.execute(sa.select(jobs).where(jobs.c.key == key)).one_or_none()
                if existing is not None:
                    return Job.from_row(existing), False
                row = conn.execute(sa.insert(jobs).values(
                    key=key, state=QUEUED, priority=priority, model=model, affinity=affinity,
                    group=group, payload=payload, attempts=0, max_attempts=max_attempts,
                    created_at=now, updated_at=now,
                ).returning(jobs)).one()
                self._record(conn, now, row.id, None, QUEUED, None, None)
                return Job.from_row(row), True
        except sa.exc.IntegrityError:
            # PostgreSQL: a concurrent enqueue inserted the key between our read and insert.
            existing = self._find_key(key)
            if existing is None:
                raise
            return existing, False

    # -- workers -----------------------------------------------------------------------------

    def claim(self, worker_id: str, *, lease_seconds: float, prefer_model: str | None = None,
              prefer_affinity: str | None = None) -> Job | None:
        """Take the next due queued job, or return None.

        Order: jobs of `prefer_model` first (and among them those of `prefer_affinity`), so a
        worker keeps its loaded model and LoRA; then priority (high first), then enqueue order.
        Jobs this worker recently found it cannot read (`release_unreadable`) are skipped.
        """
        order = []
        if prefer_model is not None:
            order.append(sa.case((jobs.c.model == prefer_model, 0), else_=1))
        if prefer_affinity is not None:
            same = jobs.c.affinity == prefer_affinity
            if prefer_model is not None:
                same = sa.and_(jobs.c.model == prefer_model, same)
            order.append(sa.case((same, 0), else_=1))
        order += [jobs.c.priority.desc(), jobs.c.id.asc()]
        with self._write() as (conn, now):
            candidate = (
                sa.select(jobs.c.id)
                .where(jobs.c.state == QUEUED,
                       sa.or_(jobs.c.run_after.is_(None), jobs.c.run_after <= now),
                       ~self._unreadable_by(worker_id, now))
                .order_by(*order)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            while (job_id := conn.scalar(candidate)) is not None:
                # Compare-and-set: on SQLite this is what makes the claim exclusive.
                row = conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.state == QUEUED)
                    .values(state=RUNNING, worker_id=worker_id,
                            lease_expires_at=now + timedelta(seconds=lease_seconds),
                            attempts=jobs.c.attempts + 1, started_at=now, updated_at=now,
                            progress=None, phase=None, step=None, steps=None)
                    .returning(jobs)
                ).one_or_none()
                if row is not None:
                    self._record(conn, now, job_id, QUEUED, RUNNING, worker_id,
                                 f"attempt {row.attempts}/{row.max_attempts}")
                    return Job.from_row(row)
            return None

    def heartbeat(self, job_id: int, worker_id: str, *, lease_seconds: float,
                  progress: float | None = None) -> bool:
        """Extend the lease; False when the job is no longer running under this worker
        (cancelled, or requeued and taken by another): the worker should stop it."""
        with self._write() as (conn, now):
            values = {"lease_expires_at": now + timedelta(seconds=lease_seconds),
                      "updated_at": now}
            if progress is not None:
                values["progress"] = progress
            result = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == RUNNING,
                       jobs.c.worker_id == worker_id)
                .values(**values)
            )
            return result.rowcount == 1

    def report_progress(self, job_id: int, worker_id: str, *, phase: str, step: int | None = None,
                        steps: int | None = None) -> bool:
        """Record what the running job is doing; False when it is no longer this worker's."""
        with self._write() as (conn, now):
            result = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == RUNNING, jobs.c.worker_id == worker_id)
                .values(phase=phase, step=step, steps=steps, updated_at=now,
                        progress=step / steps if step is not None and steps else None)
            )
            return result.rowcount == 1

    def finish(self, job_id: int, worker_id: str, result: dict) -> Job:
        """running -> done, with the result (opaque JSON).

        Done already by this same worker returns the job: the retry of a finish whose commit
        went through before the connection dropped.
        """
        with self._write() as (conn, now):
            row = self._locked(conn, job_id)
            if row is not None and row.state is DONE and row.worker_id == worker_id:
                return Job.from_row(row)
            return self._apply(conn, now, job_id, row, (RUNNING,), DONE, owner=worker_id,
                               result=result, lease_expires_at=None, finished_at=now)

    def fail(self, job_id: int, worker_id: str, error: str, *,
             retry_in: float | None) -> Job:
        """running -> queued (not before `retry_in` seconds from now) while attempts remain,
        else -> failed.

        `retry_in=None` fails the job for good (a permanent error).
        """
        with self._write() as (conn, now):
            row = self._locked(conn, job_id)
            if retry_in is not None and row is not None and row.attempts < row.max_attempts:
                return self._apply(conn, now, job_id, row, (RUNNING,), QUEUED, owner=worker_id,
                                   message=error, last_error=error,
                                   run_after=now + timedelta(seconds=retry_in),
                                   worker_id=None, lease_expires_at=None, progress=None)
            return self._apply(conn, now, job_id, row, (RUNNING,), FAILED, owner=worker_id,
                               message=error, last_error=error, lease_expires_at=None,
                               finished_at=now)

    def release(self, job_id: int, worker_id: str, reason: str) -> Job:
        """running -> queued on graceful shutdown; the attempt is given back (not a failure)."""
        with self._write() as (conn, now):
            return self._move(conn, now, job_id, (RUNNING,), QUEUED, owner=worker_id,
                              message=reason, attempts=jobs.c.attempts - 1, worker_id=None,
                              lease_expires_at=None, progress=None)

    def release_unreadable(self, job_id: int, worker_id: str, hostname: str, path: str, *,
                           recheck_in: float) -> Job:
        """running -> queued because this worker cannot read `path`, a file the job needs: the
        attempt is given back, and this worker's claims skip the job for `recheck_in` seconds,
        so workers that can read it take it meanwhile and no worker claims it over and over."""
        message = f"worker {worker_id} on {hostname} cannot read {path}"
        with self._write() as (conn, now):
            job = self._move(conn, now, job_id, (RUNNING,), QUEUED, owner=worker_id,
                             message=message, last_error=message,
                             attempts=jobs.c.attempts - 1, worker_id=None,
                             lease_expires_at=None, progress=None)
            conn.execute(sa.delete(job_unreadable).where(job_unreadable.c.job_id == job_id,
                                                         job_unreadable.c.worker_id == worker_id))
            conn.execute(sa.insert(job_unreadable).values(
                job_id=job_id, worker_id=worker_id, hostname=hostname, path=path, at=now,
                until=now + timedelta(seconds=recheck_in)))
            return job

    # -- supervision and operators -----------------------------------------------------------

    def requeue_expired(self) -> list[Job]:
        """Running jobs whose lease ran out (their worker vanished) -> queued, or -> failed
        when they have used all their attempts. Returns the jobs moved."""
        with self._write() as (conn, now):
            expired = conn.execute(
                sa.select(jobs)
                .where(jobs.c.state == RUNNING, jobs.c.lease_expires_at <= now)
                .order_by(jobs.c.id)
                .with_for_update(skip_locked=True)
            ).all()
            moved = []
            for row in expired:
                error = (f"worker {row.worker_id} vanished: lease expired at "
                         f"{row.lease_expires_at.isoformat()}")
                if row.attempts < row.max_attempts:
                    job = self._apply(conn, now, row.id, row, (RUNNING,), QUEUED, message=error,
                                      last_error=error, worker_id=None, lease_expires_at=None,
                                      progress=None)
                else:
                    job = self._apply(conn, now, row.id, row, (RUNNING,), FAILED, message=error,
                                      last_error=error, lease_expires_at=None, finished_at=now)
                moved.append(job)
            return moved

    def retry(self, job_ids: Iterable[int]) -> list[Job]:
        """failed/cancelled -> queued with attempts reset. All or nothing."""
        with self._write() as (conn, now):
            return [self._move(conn, now, job_id, (FAILED, CANCELLED), QUEUED,
                               message="retry requested", attempts=0, worker_id=None,
                               run_after=None, last_error=None, result=None, progress=None,
                               finished_at=None)
                    for job_id in dict.fromkeys(job_ids)]

    def cancel(self, job_ids: Iterable[int]) -> list[Job]:
        """queued/running -> cancelled. All or nothing. A running job's worker finds out
        through `heartbeat` returning False."""
        with self._write() as (conn, now):
            return [self._move(conn, now, job_id, (QUEUED, RUNNING), CANCELLED,
                               message="cancel requested", lease_expires_at=None,
                               finished_at=now)
                    for job_id in dict.fromkeys(job_ids)]

    # -- reads -------------------------------------------------------------------------------

    def existing_keys(self, keys: Iterable[str]) -> set[str]:
        """Those of `keys` that name a job, in any state."""
        keys, found = list(keys), set()
        with self._read() as conn:
            for start in range(0, len(keys), 500):  # within every backend's limit on bound parameters
                found.update(conn.scalars(sa.select(jobs.c.key).where(jobs.c.key.in_(keys[start:start + 500]))))
        return found

    def get(self, job_id: int) -> Job | None:
        with self._read() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one_or_none()
        return None if row is None else Job.from_row(row)

    def list_jobs(self, *, states: Iterable[JobState | str] | None = None,
                  group: str | None = None, limit: int | None = None, newest_first: bool = False) -> list[Job]:
        """Jobs in enqueue order (or the newest first), optionally only those in `states` and `group`."""
        query = sa.select(jobs).order_by(jobs.c.id.desc() if newest_first else jobs.c.id).limit(limit)
        if states is not None:
            query = query.where(jobs.c.state.in_([JobState(s) for s in states]))
        if group is not None:
            query = query.where(jobs.c.group == group)
        with self._read() as conn:
            return [Job.from_row(row) for row in conn.execute(query)]

    def group_counts(self) -> dict[str, dict[JobState, int]]:
        """Jobs per group (output folder) and state."""
        query = sa.select(jobs.c.group, jobs.c.state, sa.func.count()).group_by(jobs.c.group, jobs.c.state)
        found: dict[str, dict[JobState, int]] = {}
        with self._read() as conn:
            for group, state, n in conn.execute(query):
                found.setdefault(group, {})[JobState(state)] = n
        return found

    def recent_durations(self, model: str, limit: int = 20) -> list[float]:
        """Seconds the latest done jobs of `model` took from claim to finish, newest first."""
        query = (sa.select(jobs.c.started_at, jobs.c.finished_at)
                 .where(jobs.c.model == model, jobs.c.state == DONE, jobs.c.started_at.is_not(None))
                 .order_by(jobs.c.finished_at.desc()).limit(limit))
        with self._read() as conn:
            return [(done - started).total_seconds() for started, done in conn.execute(query)]

    def counts(self) -> dict[JobState, int]:
        """Number of jobs per state; every state is present."""
        query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        with self._read() as conn:
            found = dict(conn.execute(query).all())
        return {state: found.get(state, 0) for state in JobState}

    def outstanding(self, worker_id: str) -> int:
        """Running jobs, and queued ones this worker may still claim (now or after a retry
        delay): zero means there is nothing left for it to do or wait for."""
        with self._read() as conn:
            now = self._now(conn)
            return conn.scalar(sa.select(sa.func.count()).select_from(jobs).where(sa.or_(
                jobs.c.state == RUNNING,
                sa.and_(jobs.c.state == QUEUED, ~self._unreadable_by(worker_id, now)))))

    def unreadable(self) -> list[Unreadable]:
        """Marks on queued jobs: which worker could not read which file, oldest first."""
        query = (sa.select(job_unreadable)
                 .join(jobs, jobs.c.id == job_unreadable.c.job_id)
                 .where(jobs.c.state == QUEUED)
                 .order_by(job_unreadable.c.job_id, job_unreadable.c.at))
        with self._read() as conn:
            return [Unreadable.from_row(row) for row in conn.execute(query)]

    def events(self, job_id: int) -> list[JobEvent]:
        """The job's transitions, oldest first."""
        query = sa.select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id)
        with self._read() as conn:
            return [JobEvent.from_row(row) for row in conn.execute(query)]

    # -- worker registry ---------------------------------------------------------------------

    def register_worker(self, worker_id: str, hostname: str, pid: int, *,
                        device: str | None = None, probe: str | None = None) -> Worker:
        """Add the worker, replacing a stale entry with the same id."""
        with self._write() as (conn, now):
            conn.execute(sa.delete(workers).where(workers.c.id == worker_id))
            row = conn.execute(sa.insert(workers).values(
                id=worker_id, hostname=hostname, pid=pid, started_at=now, last_heartbeat=now,
                current_job_id=None, device=device, model=None, gone_at=None, probe=probe,
            ).returning(workers)).one()
            return Worker.from_row(row)

    def worker_heartbeat(self, worker_id: str, current_job_id: int | None, *,
                         model: str | None = None) -> bool:
        """Record that the worker is alive (live again if it was marked gone), its job and its
        loaded model; False if it is not registered (pruned meanwhile: register again)."""
        with self._write() as (conn, now):
            result = conn.execute(
                sa.update(workers).where(workers.c.id == worker_id)
                .values(last_heartbeat=now, current_job_id=current_job_id, model=model,
                        gone_at=None)
            )
            return result.rowcount == 1

    def reap_workers(self, *, stale_after: float, forget_after: float) -> list[Worker]:
        """Mark gone the workers without a heartbeat for `stale_after` seconds and return them;
        delete those gone for `forget_after` seconds. Any worker may do this for all."""
        with self._write() as (conn, now):
            gone = conn.execute(
                sa.update(workers)
                .where(workers.c.gone_at.is_(None),
                       workers.c.last_heartbeat <= now - timedelta(seconds=stale_after))
                .values(gone_at=now, current_job_id=None)
                .returning(workers)
            ).all()
            conn.execute(sa.delete(workers).where(
                workers.c.gone_at <= now - timedelta(seconds=forget_after)))
            return sorted((Worker.from_row(row) for row in gone), key=lambda w: w.id)

    def unregister_worker(self, worker_id: str) -> None:
        with self._write() as (conn, _now):
            conn.execute(sa.delete(workers).where(workers.c.id == worker_id))

    def workers(self) -> list[Worker]:
        """Every registered worker, live or gone, by host, device and id."""
        query = sa.select(workers).order_by(workers.c.hostname, workers.c.device, workers.c.id)
        with self._read() as conn:
            return [Worker.from_row(row) for row in conn.execute(query)]

    # -- internals ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[tuple[Connection, datetime]]:
        """A write transaction and its time, read once the write lock is held."""
        with self._unavailable_as_error(), self._writer.begin() as conn:
            yield conn, self._now(conn)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._unavailable_as_error(), self._engine.connect() as conn:
            yield conn

    @contextmanager
    def _unavailable_as_error(self) -> Iterator[None]:
        """Connection trouble becomes DatabaseUnavailable; errors of the statement stay as they are."""
        try:
            yield
        except sa.exc.DBAPIError as exc:
            if not _is_unavailable(exc, self._engine.dialect.name):
                raise
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
            raise DatabaseUnavailable(f"database unreachable: {reason}") from exc

    def _now(self, conn: Connection) -> datetime:
        if self._clock is not None:
            now = self._clock()
        elif conn.dialect.name == "sqlite":
            now = utcnow()
        else:
            now = conn.scalar(sa.select(sa.func.now()))
        if now.tzinfo is None:
            raise ValueError(f"the clock returned naive datetime {now!r}")
        return now.astimezone(timezone.utc)

    @staticmethod
    def _unreadable_by(worker_id: str, now: datetime) -> sa.ColumnElement[bool]:
        """The job has a mark of this worker that has not expired."""
        return sa.exists().where(job_unreadable.c.job_id == jobs.c.id,
                                 job_unreadable.c.worker_id == worker_id,
                                 job_unreadable.c.until > now)

    def _find_key(self, key: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.key == key)).one_or_none()
        return None if row is None else Job.from_row(row)

    @staticmethod
    def _locked(conn: Connection, job_id: int) -> Row | None:
        query = sa.select(jobs).where(jobs.c.id == job_id).with_for_update()
        return conn.execute(query).one_or_none()

    def _move(self, conn: Connection, now: datetime, job_id: int,
              expected: tuple[JobState, ...], to: JobState, **kwargs) -> Job:
        return self._apply(conn, now, job_id, self._locked(conn, job_id), expected, to, **kwargs)

    def _apply(self, conn: Connection, now: datetime, job_id: int, row: Row | None,
               expected: tuple[JobState, ...], to: JobState, *, owner: str | None = None,
               message: str | None = None, **values) -> Job:
        """Move `row` (read under lock) to `to` if it is in `expected` (and held by `owner`),
        guarded in SQL by its state; record the event. Raises JobStateError otherwise."""
        new = None
        if row is not None and row.state in expected and owner in (None, row.worker_id):
            guard = [jobs.c.id == job_id, jobs.c.state == row.state]
            if owner is not None:
                guard.append(jobs.c.worker_id == owner)
            new = conn.execute(
                sa.update(jobs).where(*guard).values(state=to, updated_at=now, **values)
                .returning(jobs)
            ).one_or_none()
        if new is None:
            raise JobStateError(_mismatch(job_id, expected, owner, row))
        self._record(conn, now, job_id, row.state, to, owner or row.worker_id, message)
        return Job.from_row(new)

    @staticmethod
    def _record(conn: Connection, now: datetime, job_id: int, src: JobState | None,
                dst: JobState, worker_id: str | None, message: str | None) -> None:
        conn.execute(sa.insert(job_events).values(job_id=job_id, at=now, from_state=src,
                                                  to_state=dst, worker_id=worker_id,
                                                  message=message))


def _mismatch(job_id: int, expected: tuple[JobState, ...], owner: str | None,
              row: Row | None) -> str:
    wanted = " or ".join(state.value for state in expected)
    if owner is not None:
        wanted += f" under worker {owner}"
    if row is None:
        return f"job {job_id} does not exist (expected {wanted})"
    found = row.state.value + (f" under worker {row.worker_id}" if row.worker_id else "")
    return f"job {job_id} is {found}, expected {wanted}"


def _is_unavailable(exc: sa.exc.DBAPIError, dialect: str) -> bool:
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return False
    if dialect == "sqlite":
        return str(exc.orig).lower().startswith(_SQLITE_UNAVAILABLE)
    # PostgreSQL drivers raise these for a lost or refused connection, a server shutting down or
    # starting up, and transient conflicts (deadlock, serialization): all worth a retry.
    return True


def _sqlite_path(url: sa.URL) -> str | None:
    """The database file of a plain SQLite URL; None for memory, a URI or another database."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or url.query.get("uri"):
        return None
    return url.database


def _configure_sqlite(engine: sa.Engine, busy_timeout: float) -> None:
    """SQLAlchemy's documented pysqlite recipe: we, not the driver, emit BEGIN."""

    if (path := _sqlite_path(engine.url)) is not None:
        @sa.event.listens_for(engine, "do_connect")
        def _open_existing(_dialect, _record, cargs, cparams) -> None:
            # Open the file, never create it: a database deleted under a running daemon must not
            # come back empty at the next connection (only upgrade_schema creates one).
            cargs[:] = [f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=rw"]
            cparams["uri"] = True

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # pysqlite would BEGIN (deferred) only before DML; a deferred transaction that reads
        # and then writes gets SQLITE_BUSY at once instead of waiting on busy_timeout.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front; readers keep WAL's concurrent snapshots.
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
