"""The queue's schema versions (Alembic), on SQLite and, when PREVIEWD_TEST_PG_URL is set, on
PostgreSQL: a database made by previewd 0.1 is adopted and upgraded with every job and event
intact; processes upgrading together migrate once; a database migrated by a newer previewd is
refused; the newest revision is exactly schema.py."""

from __future__ import annotations

import multiprocessing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from previewd.queue import JobState, JobStore, SchemaVersionError
from previewd.queue import migrate
from previewd.queue.schema import UTCDateTime, metadata
from pgserver import PG_URL, fresh_database
from test_job_store import LEASE, assert_history_is_legal

DATA = Path(__file__).parent / "data"
HEAD = migrate.script_directory().get_current_head()
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """new_url() -> the URL of another empty database of this backend."""
    if request.param == "postgresql" and not PG_URL:
        pytest.skip("set PREVIEWD_TEST_PG_URL to run against PostgreSQL")
    opened, made = [], []

    def new_url() -> str:
        made.append(True)
        if request.param == "sqlite":
            path = tmp_path / f"db{len(made)}.sqlite"
            path.touch()  # empty, as a new PostgreSQL database is (only upgrade_schema creates a file)
            return f"sqlite:///{path}"
        manager = fresh_database()
        opened.append(manager)
        return manager.__enter__()

    yield new_url
    for manager in opened:
        manager.__exit__(None, None, None)


def create_0_1(url: str) -> sa.Engine:
    """The tables exactly as previewd 0.1 created them (its DDL, captured)."""
    engine = sa.create_engine(url)
    script = (DATA / f"previewd-0.1.{engine.dialect.name}.sql").read_text()
    statements = "\n".join(line for line in script.splitlines() if not line.startswith("--"))
    with engine.begin() as conn:
        for statement in statements.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
    return engine


# previewd 0.1's rows as its store wrote them (UTCDateTime and JSON as they were then).
_JOBS = sa.table("jobs", *(sa.column(name) for name in (
    "id", "key", "state", "priority", "model", "affinity", "group", "attempts", "max_attempts",
    "worker_id", "progress", "last_error")),
    sa.column("payload", sa.JSON), sa.column("result", sa.JSON),
    *(sa.column(name, UTCDateTime) for name in ("lease_expires_at", "run_after", "created_at",
                                                 "updated_at", "started_at", "finished_at")))
_EVENTS = sa.table("job_events", sa.column("id"), sa.column("job_id"), sa.column("at", UTCDateTime),
                   sa.column("from_state"), sa.column("to_state"), sa.column("worker_id"),
                   sa.column("message"))
_WORKERS = sa.table("workers", sa.column("id"), sa.column("hostname"), sa.column("pid"),
                    sa.column("started_at", UTCDateTime), sa.column("last_heartbeat", UTCDateTime),
                    sa.column("current_job_id"))


def fill_like_0_1(engine: sa.Engine) -> None:
    def job(id, state, **values):
        row = dict(id=id, key=f"key-{id}", state=state, priority=0, model="qwen_image_2512",
                   affinity=f"sha-{id}", group="/runs/a/previews", attempts=0, max_attempts=3,
                   worker_id=None, progress=None, last_error=None, payload={"target": {"prompt_index": id}},
                   result=None, lease_expires_at=None, run_after=None, created_at=T0, updated_at=T0,
                   started_at=None, finished_at=None)
        return row | values

    later = T0 + timedelta(minutes=5)
    with engine.begin() as conn:
        conn.execute(sa.insert(_JOBS), [
            job(1, "done", attempts=1, worker_id="host-a:1:aaaaaa", progress=1.0, started_at=T0,
                finished_at=later, updated_at=later, result={"image": "/runs/a/previews/1.png", "seed": 42}),
            job(2, "failed", attempts=3, worker_id="host-a:1:aaaaaa", last_error="LoraError: no key",
                started_at=T0, finished_at=later, updated_at=later),
            job(3, "running", attempts=1, worker_id="host-a:1:aaaaaa", progress=0.5, started_at=T0,
                lease_expires_at=T0 + timedelta(seconds=300)),
            job(4, "queued", run_after=later, last_error="PipelineOutOfMemory: retry", attempts=1),
        ])
        events = [(1, None, "queued"), (1, "queued", "running"), (1, "running", "done"),
                  (2, None, "queued"), (2, "queued", "running"), (2, "running", "failed"),
                  (3, None, "queued"), (3, "queued", "running"),
                  (4, None, "queued"), (4, "queued", "running"), (4, "running", "queued")]
        conn.execute(sa.insert(_EVENTS), [
            dict(id=n, job_id=job_id, at=T0 + timedelta(seconds=n), from_state=src, to_state=dst,
                 worker_id=None if src is None else "host-a:1:aaaaaa", message=f"event {n}")
            for n, (job_id, src, dst) in enumerate(events, 1)])
        conn.execute(sa.insert(_WORKERS).values(id="host-a:1:aaaaaa", hostname="host-a", pid=1, started_at=T0,
                                                last_heartbeat=later, current_job_id=3))
        if engine.dialect.name == "postgresql":  # 0.1 inserted through the sequences
            for table in ("jobs", "job_events"):
                conn.exec_driver_sql(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))")


def dump(engine: sa.Engine) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        return {table: [tuple(row) for row in conn.execute(sa.select(_table).order_by(_table.c.id))]
                for table, _table in (("jobs", _JOBS), ("job_events", _EVENTS), ("workers", _WORKERS))}


def test_database_of_0_1_is_adopted_with_every_job_and_event_intact(database):
    url = database()
    engine = create_0_1(url)
    fill_like_0_1(engine)
    before = dump(engine)

    with JobStore(url) as store:
        assert store.schema_revision() is None
        assert store.upgrade_schema() == (migrate.BASELINE, HEAD)
        assert store.schema_revision() == HEAD
        assert dump(engine) == before
        jobs = {job.id: job for job in store.list_jobs()}
        assert [(j.id, j.state) for j in jobs.values()] == [
            (1, JobState.DONE), (2, JobState.FAILED), (3, JobState.RUNNING), (4, JobState.QUEUED)]
        assert jobs[1].result == {"image": "/runs/a/previews/1.png", "seed": 42} and jobs[1].finished_at == T0 + timedelta(minutes=5)
        assert jobs[4].payload == {"target": {"prompt_index": 4}} and jobs[4].run_after == T0 + timedelta(minutes=5)
        assert [e.message for e in store.events(4)] == ["event 9", "event 10", "event 11"]
        [worker] = store.workers()
        assert (worker.hostname, worker.current_job_id, worker.device, worker.gone_at) == ("host-a", 3, None, None)

        # The adopted queue works on: the old running job's lease has long expired, ids go on.
        [requeued] = store.requeue_expired()
        assert requeued.id == 3
        new, created = store.enqueue(key="new", payload={}, model="flux2", group="g")
        assert created and new.id == 5
        assert {store.claim("w2", lease_seconds=LEASE).id for _ in range(3)} == {3, 4, 5}
        assert_history_is_legal(store)
    engine.dispose()


def test_upgrade_at_head_changes_nothing(database):
    url = database()
    with JobStore(url) as store:
        assert store.upgrade_schema() == (None, HEAD)
        store.enqueue(key="k", payload={}, model="flux2", group="g")
        assert store.upgrade_schema() == (HEAD, HEAD)
        assert len(store.list_jobs()) == 1


def _upgrade_in_process(url, barrier, results):
    store = JobStore(url)
    store.now()  # connect before the start line, so the processes really race
    barrier.wait(timeout=60)
    results.put(store.upgrade_schema())
    store.close()


def test_processes_starting_together_migrate_once(database):
    url = database()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_upgrade_in_process, args=(url, barrier, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    outcomes = sorted((results.get(timeout=120) for _ in procs), key=lambda found_head: found_head[0] or "")
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert outcomes == [(None, HEAD)] + [(HEAD, HEAD)] * 3
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
    engine.dispose()


def test_database_of_a_newer_previewd_is_refused(database):
    url = database()
    with JobStore(url) as store:
        store.upgrade_schema()
        with store._engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(SchemaVersionError, match=r"revision 9999, which this previewd .* does not know: "
                                                     r"a newer previewd upgraded it"):
            store.upgrade_schema()
        assert store.schema_revision() == "9999"


def test_queue_tables_of_another_layout_are_refused(database):
    url = database()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT)")
    with JobStore(url) as store, pytest.raises(SchemaVersionError, match="not previewd 0.1's layout"):
        store.upgrade_schema()
    assert sa.inspect(engine).get_table_names() == ["jobs"]  # nothing was created or stamped
    engine.dispose()


def _layout(engine: sa.Engine) -> dict:
    inspector = sa.inspect(engine)
    layout = {}
    for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
        layout[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("comment"))
                        for c in inspector.get_columns(table)],
            "pk": inspector.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted((tuple(fk["constrained_columns"]), fk["referred_table"], fk["options"].get("ondelete"))
                          for fk in inspector.get_foreign_keys(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
            "checks": sorted((c["name"], " ".join(c["sqltext"].split())) for c in inspector.get_check_constraints(table)),
        }
    return layout


def test_baseline_revision_is_exactly_the_0_1_layout(database):
    made_by_0_1 = create_0_1(database())
    migrated = sa.create_engine(database())
    with migrated.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), migrate.BASELINE)
    assert _layout(migrated) == _layout(made_by_0_1)
    made_by_0_1.dispose()
    migrated.dispose()


def test_head_is_exactly_schema_py_and_every_revision_goes_down_and_up(database):
    url = database()
    with JobStore(url) as store:
        store.upgrade_schema()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        command.downgrade(migrate.alembic_config(conn), "base")
        assert set(sa.inspect(conn).get_table_names()) == {"alembic_version"}
        command.upgrade(migrate.alembic_config(conn), "head")
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()
