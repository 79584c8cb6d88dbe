"""JobStore contract, run against SQLite always and PostgreSQL when PREVIEWD_TEST_PG_URL is set
(huey's StorageTests pattern: one mixin, one subclass per backend)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from previewd.errors import JobStateError
import pgserver
from previewd.queue import DatabaseUnavailable, JobState, JobStore
from previewd.queue.states import is_allowed
from pgserver import PG_URL, fresh_database

LEASE = 30.0


class FakeClock:
    def __init__(self):
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def add(store: JobStore, key: str, **kwargs):
    kwargs.setdefault("model", "qwen_image")
    kwargs.setdefault("group", "outbox/run1")
    job, created = store.enqueue(key=key, payload={"key": key}, **kwargs)
    assert created
    return job


def assert_history_is_legal(store: JobStore) -> None:
    """Every event follows the transition table and the chain ends in the job's state."""
    for job in store.list_jobs():
        state = None
        for event in store.events(job.id):
            assert event.from_state == state, (job.id, event)
            assert (event.to_state is JobState.QUEUED if state is None
                    else is_allowed(state, event.to_state)), (job.id, event)
            state = event.to_state
        assert state == job.state, job


def _claim_all_in_process(url, worker_id, barrier, results):
    store = JobStore(url)
    store.counts()  # connect before the start line, so both processes really race
    barrier.wait(timeout=30)
    claimed = []
    while (job := store.claim(worker_id, lease_seconds=LEASE)) is not None:
        claimed.append(job.id)
        time.sleep(0.001)  # "work": else SQLite's busy backoff lets one process take all 50
    store.close()
    results.put(claimed)


class StoreContract:
    """Subclasses provide a `url` fixture pointing at an empty database."""

    @pytest.fixture
    def clock(self):
        return FakeClock()

    @pytest.fixture
    def store(self, url, clock):
        store = JobStore(url, clock=clock)
        store.create_schema()
        yield store
        assert_history_is_legal(store)

    def test_existing_keys_are_those_of_jobs_in_any_state(self, store):
        keys = [f"k{i}" for i in range(1200)]  # more than one batch of bound parameters
        for key in keys[:3]:
            store.enqueue(key=key, payload={}, model="m", group="g")
        store.cancel([store.list_jobs()[0].id])
        assert store.existing_keys(keys + ["other"]) == {"k0", "k1", "k2"}
        assert store.existing_keys([]) == set()
        store.close()

    # -- enqueue -----------------------------------------------------------------------------

    def test_create_schema_is_idempotent(self, store):
        add(store, "a")
        store.create_schema()
        assert [j.key for j in store.list_jobs()] == ["a"]

    def test_enqueue_returns_new_queued_job(self, store, clock):
        job, created = store.enqueue(key="k1", payload={"prompt": "a cat", "seeds": [1, 2]},
                                     model="flux2", group="out/a", affinity="sha-1",
                                     priority=5, max_attempts=4)
        assert created
        assert job == store.get(job.id)
        assert (job.state, job.attempts, job.max_attempts, job.priority) == (
            JobState.QUEUED, 0, 4, 5)
        assert job.payload == {"prompt": "a cat", "seeds": [1, 2]}
        assert (job.model, job.affinity, job.group) == ("flux2", "sha-1", "out/a")
        assert job.created_at == clock.now
        assert job.worker_id is job.lease_expires_at is job.started_at is None

    def test_enqueue_is_idempotent_by_key_in_any_state(self, store):
        first = add(store, "same")
        again, created = store.enqueue(key="same", payload={"other": 1}, model="flux2", group="x")
        assert (again, created) == (first, False)

        store.claim("w1", lease_seconds=LEASE)
        done = store.finish(first.id, "w1", {"images": ["a.png"]})
        again, created = store.enqueue(key="same", payload={}, model="qwen_image", group="x")
        assert (again, created) == (done, False)
        assert len(store.list_jobs()) == 1

    @pytest.mark.parametrize("key", ["", "x" * 65])
    def test_enqueue_rejects_bad_keys(self, store, key):
        with pytest.raises(ValueError, match="key"):
            store.enqueue(key=key, payload={}, model="m", group="g")

    def test_clock_must_be_aware(self, url):
        with JobStore(url, clock=datetime.now) as store:
            store.create_schema()
            with pytest.raises(ValueError, match="naive"):
                store.enqueue(key="k", payload={}, model="m", group="g")

    # -- claim -------------------------------------------------------------------------------

    def test_claim_empty_queue_returns_none(self, store):
        assert store.claim("w1", lease_seconds=LEASE) is None

    def test_claim_marks_running_with_lease(self, store, clock):
        job = add(store, "a")
        claimed = store.claim("w1", lease_seconds=LEASE)
        assert claimed.id == job.id
        assert claimed.state is JobState.RUNNING
        assert claimed.worker_id == "w1"
        assert claimed.attempts == 1
        assert claimed.started_at == clock.now
        assert claimed.lease_expires_at == clock.now + timedelta(seconds=LEASE)
        assert store.claim("w2", lease_seconds=LEASE) is None

    def test_claim_order_is_priority_then_fifo(self, store):
        ids = {key: add(store, key, priority=p).id
               for key, p in [("low", 0), ("high1", 9), ("mid", 5), ("high2", 9)]}
        order = [store.claim("w", lease_seconds=LEASE).id for _ in ids]
        assert order == [ids["high1"], ids["high2"], ids["mid"], ids["low"]]

    def test_claim_prefers_loaded_model_then_lora(self, store):
        ids = {key: add(store, key, model=model, affinity=lora, priority=p).id
               for key, model, lora, p in [
                   ("flux-urgent", "flux2", "l1", 9),
                   ("qwen-l1", "qwen_image", "l1", 0),
                   ("qwen-l2", "qwen_image", "l2", 0),
                   ("qwen-l2-hi", "qwen_image", "l2", 3),
                   ("qwen-none", "qwen_image", None, 1),
               ]}
        order = [store.claim("w", lease_seconds=LEASE, prefer_model="qwen_image",
                             prefer_affinity="l2").id for _ in ids]
        assert order == [ids[k] for k in
                         ["qwen-l2-hi", "qwen-l2", "qwen-none", "qwen-l1", "flux-urgent"]]

    def test_affinity_preference_alone(self, store):
        first = add(store, "a", affinity="l1", priority=1)
        second = add(store, "b", affinity="l2")
        assert store.claim("w", lease_seconds=LEASE, prefer_affinity="l2").id == second.id
        assert store.claim("w", lease_seconds=LEASE, prefer_affinity="l2").id == first.id

    # -- guarded transitions -----------------------------------------------------------------

    def test_finish_records_result(self, store, clock):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        clock.advance(5)
        done = store.finish(job.id, "w1", {"images": ["0.png"]})
        assert done.state is JobState.DONE
        assert done.result == {"images": ["0.png"]}
        assert done.finished_at == clock.now
        assert done.lease_expires_at is None

    def test_transition_from_wrong_state_raises_and_changes_nothing(self, store):
        job = add(store, "a")
        with pytest.raises(JobStateError, match=rf"job {job.id} is queued, expected running"):
            store.finish(job.id, "w1", {})
        with pytest.raises(JobStateError, match=rf"job {job.id} .*expected failed or cancelled"):
            store.retry([job.id])
        assert store.get(job.id) == job
        assert len(store.events(job.id)) == 1

    def test_transition_by_other_worker_raises(self, store):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        for call in (lambda: store.finish(job.id, "w2", {}),
                     lambda: store.fail(job.id, "w2", "boom", retry_in=None),
                     lambda: store.release(job.id, "w2", "shutdown")):
            with pytest.raises(JobStateError, match="under worker w1, expected running under "
                                                    "worker w2"):
                call()
        assert store.get(job.id).state is JobState.RUNNING

    def test_unknown_job_raises(self, store):
        with pytest.raises(JobStateError, match="job 999 does not exist"):
            store.finish(999, "w1", {})
        assert store.get(999) is None

    def test_done_is_terminal(self, store):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        store.finish(job.id, "w1", {})
        with pytest.raises(JobStateError, match="is done"):
            store.cancel([job.id])
        with pytest.raises(JobStateError, match="is done"):
            store.retry([job.id])

    def test_batch_operations_are_all_or_nothing(self, store):
        queued = add(store, "a")
        done = add(store, "b", priority=1)
        store.claim("w1", lease_seconds=LEASE)
        store.finish(done.id, "w1", {})
        with pytest.raises(JobStateError):
            store.cancel([queued.id, done.id])
        assert store.get(queued.id).state is JobState.QUEUED

    # -- leases ------------------------------------------------------------------------------

    def test_expired_lease_is_requeued(self, store, clock):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        clock.advance(LEASE - 1)
        assert store.requeue_expired() == []
        clock.advance(1)
        [requeued] = store.requeue_expired()
        assert requeued.id == job.id
        assert requeued.state is JobState.QUEUED
        assert requeued.worker_id is None
        assert "worker w1 vanished" in requeued.last_error

        # The vanished worker comes back: it has lost the job and cannot record it.
        assert not store.heartbeat(job.id, "w1", lease_seconds=LEASE)
        again = store.claim("w2", lease_seconds=LEASE)
        assert (again.id, again.attempts, again.worker_id) == (job.id, 2, "w2")
        assert not store.heartbeat(job.id, "w1", lease_seconds=LEASE)
        with pytest.raises(JobStateError):
            store.finish(job.id, "w1", {})
        assert store.finish(job.id, "w2", {}).state is JobState.DONE

    def test_expired_lease_on_last_attempt_fails(self, store, clock):
        job = add(store, "a", max_attempts=1)
        store.claim("w1", lease_seconds=LEASE)
        clock.advance(LEASE)
        [failed] = store.requeue_expired()
        assert failed.state is JobState.FAILED
        assert "vanished" in failed.last_error
        assert failed.finished_at == clock.now
        assert store.claim("w2", lease_seconds=LEASE) is None
        assert store.get(job.id) == failed

    def test_heartbeat_extends_lease_and_records_progress(self, store, clock):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        clock.advance(LEASE - 5)
        assert store.heartbeat(job.id, "w1", lease_seconds=LEASE, progress=0.25)
        clock.advance(LEASE - 5)
        assert store.requeue_expired() == []
        current = store.get(job.id)
        assert current.progress == 0.25
        assert current.lease_expires_at == clock.now + timedelta(seconds=5)
        assert not store.heartbeat(job.id, "w2", lease_seconds=LEASE)
        assert len(store.events(job.id)) == 2

    # -- failure and retry -------------------------------------------------------------------

    def test_transient_failure_waits_for_run_after(self, store, clock):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        failed = store.fail(job.id, "w1", "CUDA out of memory", retry_in=20)
        assert failed.state is JobState.QUEUED
        assert failed.run_after == clock.now + timedelta(seconds=20)
        assert failed.last_error == "CUDA out of memory"
        assert failed.worker_id is None
        assert store.claim("w1", lease_seconds=LEASE) is None
        clock.advance(19)
        assert store.claim("w1", lease_seconds=LEASE) is None
        clock.advance(1)
        assert store.claim("w1", lease_seconds=LEASE).attempts == 2

    def test_due_retry_does_not_block_other_jobs(self, store, clock):
        waiting = add(store, "waiting", priority=9)
        other = add(store, "other")
        store.claim("w1", lease_seconds=LEASE)
        store.fail(waiting.id, "w1", "oom", retry_in=60)
        assert store.claim("w1", lease_seconds=LEASE).id == other.id

    def test_failure_without_retry_in_is_final(self, store):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        failed = store.fail(job.id, "w1", "LoRA keys do not match", retry_in=None)
        assert failed.state is JobState.FAILED
        assert failed.last_error == "LoRA keys do not match"
        assert failed.finished_at is not None

    def test_failure_after_max_attempts_is_final(self, store, clock):
        job = add(store, "a", max_attempts=2)
        for _ in range(2):
            store.claim("w1", lease_seconds=LEASE)
            last = store.fail(job.id, "w1", "oom", retry_in=0)
        assert last.state is JobState.FAILED
        assert last.attempts == 2

    def test_retry_requeues_failed_and_cancelled_with_attempts_reset(self, store):
        failed = add(store, "a", max_attempts=1)
        cancelled = add(store, "b")
        store.claim("w1", lease_seconds=LEASE)
        store.fail(failed.id, "w1", "boom", retry_in=None)
        store.cancel([cancelled.id])
        retried = store.retry([failed.id, cancelled.id, failed.id])
        assert [(j.id, j.state, j.attempts, j.last_error) for j in retried] == [
            (failed.id, JobState.QUEUED, 0, None), (cancelled.id, JobState.QUEUED, 0, None)]
        assert store.claim("w1", lease_seconds=LEASE).attempts == 1

    # -- cancel and release ------------------------------------------------------------------

    def test_cancel_running_job_makes_heartbeat_fail(self, store, clock):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        [cancelled] = store.cancel([job.id])
        assert cancelled.state is JobState.CANCELLED
        assert cancelled.finished_at == clock.now
        assert not store.heartbeat(job.id, "w1", lease_seconds=LEASE)
        with pytest.raises(JobStateError, match="is cancelled"):
            store.finish(job.id, "w1", {})
        clock.advance(LEASE * 2)
        assert store.requeue_expired() == []

    def test_cancel_queued_job_is_never_claimed(self, store):
        job = add(store, "a")
        store.cancel([job.id])
        assert store.claim("w1", lease_seconds=LEASE) is None

    def test_release_gives_the_attempt_back(self, store):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        released = store.release(job.id, "w1", "shutting down")
        assert released.state is JobState.QUEUED
        assert released.attempts == 0
        assert released.worker_id is released.lease_expires_at is None
        assert store.events(job.id)[-1].message == "shutting down"
        assert store.claim("w2", lease_seconds=LEASE).attempts == 1

    # -- events and reads --------------------------------------------------------------------

    def test_events_record_every_transition(self, store, clock):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        clock.advance(1)
        store.fail(job.id, "w1", "oom", retry_in=0)
        store.claim("w2", lease_seconds=LEASE)
        store.finish(job.id, "w2", {})
        events = store.events(job.id)
        assert [(e.from_state, e.to_state, e.worker_id, e.message) for e in events] == [
            (None, JobState.QUEUED, None, None),
            (JobState.QUEUED, JobState.RUNNING, "w1", "attempt 1/3"),
            (JobState.RUNNING, JobState.QUEUED, "w1", "oom"),
            (JobState.QUEUED, JobState.RUNNING, "w2", "attempt 2/3"),
            (JobState.RUNNING, JobState.DONE, "w2", None),
        ]
        assert events[2].at == clock.now
        assert store.events(999) == []

    def test_list_jobs_filters_and_counts(self, store):
        a = add(store, "a", group="g1")
        b = add(store, "b", group="g2")
        c = add(store, "c", group="g1")
        store.claim("w1", lease_seconds=LEASE)
        assert [j.id for j in store.list_jobs()] == [a.id, b.id, c.id]
        assert [j.id for j in store.list_jobs(group="g1")] == [a.id, c.id]
        assert [j.id for j in store.list_jobs(states=["queued"])] == [b.id, c.id]
        assert [j.id for j in store.list_jobs(states=[JobState.QUEUED], group="g1")] == [c.id]
        assert [j.id for j in store.list_jobs(limit=2)] == [a.id, b.id]
        assert store.counts() == {JobState.QUEUED: 2, JobState.RUNNING: 1, JobState.DONE: 0,
                                  JobState.FAILED: 0, JobState.CANCELLED: 0}

    # -- worker registry ---------------------------------------------------------------------

    def test_worker_registry(self, store, clock):
        job = add(store, "a")
        worker = store.register_worker("w1", "gpu-host", 4242, device="cuda:1", probe="/state/.probe-w1")
        assert (worker.hostname, worker.pid, worker.device, worker.probe, worker.current_job_id, worker.model,
                worker.gone_at) == ("gpu-host", 4242, "cuda:1", "/state/.probe-w1", None, None, None)
        clock.advance(10)
        assert store.worker_heartbeat("w1", job.id, model="flux2")
        [seen] = store.workers()
        assert (seen.last_heartbeat, seen.current_job_id, seen.model) == (clock.now, job.id, "flux2")
        assert seen.started_at == worker.started_at
        store.register_worker("w1", "gpu-host", 5151)
        assert [w.pid for w in store.workers()] == [5151]
        store.unregister_worker("w1")
        assert store.workers() == []
        assert not store.worker_heartbeat("w1", None)

    def test_workers_are_listed_by_host_and_device(self, store):
        for worker_id, host, device in [("w1", "b", "cuda:0"), ("w2", "a", "cuda:1"), ("w3", "a", "cuda:0")]:
            store.register_worker(worker_id, host, 1, device=device)
        assert [w.id for w in store.workers()] == ["w3", "w2", "w1"]

    def test_silent_workers_are_marked_gone_then_forgotten(self, store, clock):
        job = add(store, "a")
        store.register_worker("quiet", "host-a", 1, device="cuda:0")
        store.register_worker("busy", "host-b", 2, device="cuda:0")
        store.worker_heartbeat("quiet", job.id)
        clock.advance(LEASE - 1)
        store.worker_heartbeat("busy", None)
        assert store.reap_workers(stale_after=LEASE, forget_after=3600) == []
        clock.advance(1)
        [gone] = store.reap_workers(stale_after=LEASE, forget_after=3600)
        assert (gone.id, gone.gone_at, gone.current_job_id) == ("quiet", clock.now, None)
        assert store.reap_workers(stale_after=LEASE, forget_after=3600) == []  # once
        # A worker that was only cut off (a long database outage) is live again on its next beat.
        assert store.worker_heartbeat("quiet", None)
        assert all(w.gone_at is None for w in store.workers())
        clock.advance(LEASE)
        assert {w.id for w in store.reap_workers(stale_after=LEASE, forget_after=3600)} == {"quiet", "busy"}
        clock.advance(3600)
        store.reap_workers(stale_after=LEASE, forget_after=3600)
        assert store.workers() == []

    # -- files a worker cannot read ----------------------------------------------------------

    def test_unreadable_job_is_left_to_other_workers_and_rechecked_later(self, store, clock):
        job = add(store, "a", priority=1)
        other = add(store, "b")
        assert store.claim("w1", lease_seconds=LEASE).id == job.id
        released = store.release_unreadable(job.id, "w1", "host-a", "/state/checkpoints/x.safetensors",
                                            recheck_in=300)
        assert (released.state, released.attempts, released.worker_id) == (JobState.QUEUED, 0, None)
        assert released.last_error == "worker w1 on host-a cannot read /state/checkpoints/x.safetensors"
        assert store.events(job.id)[-1].message == released.last_error
        [mark] = store.unreadable()
        assert (mark.job_id, mark.worker_id, mark.hostname, mark.until) == (
            job.id, "w1", "host-a", clock.now + timedelta(seconds=300))
        # w1 passes over it (no claim loop); the others still see it first.
        assert store.claim("w1", lease_seconds=LEASE).id == other.id
        assert store.claim("w1", lease_seconds=LEASE) is None
        assert store.outstanding("w1") == 1  # only its own running job
        store.finish(other.id, "w1", {})
        assert store.outstanding("w1") == 0 and store.outstanding("w2") == 1
        clock.advance(300)
        assert store.outstanding("w1") == 1
        assert store.claim("w1", lease_seconds=LEASE).id == job.id
        # Again unreadable: the mark is renewed, not doubled; done jobs' marks are not listed.
        store.release_unreadable(job.id, "w1", "host-a", "/x", recheck_in=300)
        assert [m.path for m in store.unreadable()] == ["/x"]
        store.claim("w2", lease_seconds=LEASE)
        store.finish(job.id, "w2", {})
        assert store.unreadable() == []

    def test_outstanding_counts_delayed_retries(self, store):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        store.fail(job.id, "w1", "oom", retry_in=60)
        assert store.claim("w1", lease_seconds=LEASE) is None
        assert store.outstanding("w1") == 1

    # -- the database going away ---------------------------------------------------------------

    def test_a_retried_finish_whose_first_commit_went_through_returns_the_job(self, store):
        job = add(store, "a")
        store.claim("w1", lease_seconds=LEASE)
        done = store.finish(job.id, "w1", {"image": "a.png"})
        assert store.finish(job.id, "w1", {"image": "a.png"}) == done
        with pytest.raises(JobStateError, match="is done under worker w1"):
            store.finish(job.id, "w2", {})
        assert [e.to_state for e in store.events(job.id)].count(JobState.DONE) == 1

    def test_worker_current_job_must_exist(self, store):
        store.register_worker("w1", "gpu-host", 1)
        with pytest.raises(sa.exc.IntegrityError):
            store.worker_heartbeat("w1", 12345)

    # -- concurrency -------------------------------------------------------------------------

    def test_claim_race_between_threads(self, store):
        ids = [add(store, f"job-{i}").id for i in range(50)]
        barrier = threading.Barrier(2)
        claimed: dict[str, list[int]] = {"t1": [], "t2": []}
        errors = []

        def claim_all(worker_id):
            try:
                barrier.wait(timeout=10)
                while (job := store.claim(worker_id, lease_seconds=LEASE)) is not None:
                    claimed[worker_id].append(job.id)
                    time.sleep(0.001)
            except Exception as exc:  # surfaced below: a thread's exception would be lost
                errors.append(exc)

        threads = [threading.Thread(target=claim_all, args=(w,)) for w in claimed]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert errors == []
        assert sorted(claimed["t1"] + claimed["t2"]) == ids
        assert all(j.attempts == 1 for j in store.list_jobs())

    def test_claim_race_between_processes(self, store, url):
        ids = [add(store, f"job-{i}").id for i in range(50)]
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(2)
        results = ctx.Queue()
        procs = [ctx.Process(target=_claim_all_in_process, args=(url, f"p{n}", barrier, results))
                 for n in range(2)]
        for p in procs:
            p.start()
        claimed = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=10)
            assert p.exitcode == 0
        assert sorted(claimed[0] + claimed[1]) == ids
        assert all(j.attempts == 1 for j in store.list_jobs())


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def url(self, tmp_path):
        return f"sqlite:///{tmp_path / 'previewd.db'}"

    def test_database_is_in_wal_mode(self, store, tmp_path):
        with sqlite3.connect(tmp_path / "previewd.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    def test_locked_beyond_the_busy_timeout_is_unavailable_not_fatal(self, store, url, tmp_path):
        job = add(store, "a")
        impatient = JobStore(url, busy_timeout=0.1)
        holder = sqlite3.connect(tmp_path / "previewd.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(DatabaseUnavailable, match="database unreachable: database is locked"):
                impatient.claim("w1", lease_seconds=LEASE)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert impatient.claim("w1", lease_seconds=LEASE).id == job.id
        impatient.close()

    def test_errors_of_the_statement_are_not_unavailability(self, tmp_path):
        (tmp_path / "empty.db").touch()  # an empty file is an empty SQLite database
        with JobStore(f"sqlite:///{tmp_path / 'empty.db'}") as store:
            with pytest.raises(sa.exc.OperationalError, match="no such table"):
                store.counts()

    def test_a_deleted_database_file_is_not_created_afresh_by_a_connection(self, tmp_path):
        db = tmp_path / "q.db"
        with JobStore(f"sqlite:///{db}") as store:
            store.create_schema()
            store.enqueue(key="a", payload={}, model="m", group="g")
            store.close()  # no pooled connection survives: the next statement opens the path again
            db.unlink()
            with pytest.raises(DatabaseUnavailable, match="unable to open"):
                store.counts()
            assert not db.exists()
            store.upgrade_schema()  # the one call that creates it, on purpose
            assert db.exists() and not any(store.counts().values())


@pytest.mark.skipif(not PG_URL, reason="set PREVIEWD_TEST_PG_URL to run against PostgreSQL")
class TestPostgresStore(StoreContract):
    @pytest.fixture
    def url(self):
        with fresh_database() as url:
            yield url

    def test_leases_use_the_database_clock_not_the_hosts(self, url, monkeypatch):
        monkeypatch.setattr("previewd.queue.store.utcnow", lambda: datetime.now(timezone.utc) + timedelta(hours=2))
        with JobStore(url) as skewed, JobStore(url) as other:
            skewed.create_schema()
            job = add(skewed, "a")
            claimed = skewed.claim("w1", lease_seconds=LEASE)
            lease_left = (claimed.lease_expires_at - other.now()).total_seconds()
            assert LEASE - 5 < lease_left <= LEASE
            assert other.requeue_expired() == []  # a host two hours ahead takes nothing early
            assert skewed.requeue_expired() == []
            assert skewed.get(job.id).state is JobState.RUNNING

    def test_unreachable_server_is_unavailable(self):
        dead = "postgresql+psycopg://postgres@/postgres?host=/nonexistent-previewd&port=1"
        with JobStore(dead) as store, pytest.raises(DatabaseUnavailable, match="database unreachable"):
            store.claim("w1", lease_seconds=LEASE)

    def test_store_carries_on_after_a_server_restart(self, store):
        if pgserver.control("status").returncode == 4:
            pytest.skip("the test server was not started by .ci/postgres.sh: it cannot be restarted")
        job = add(store, "a")
        assert pgserver.control("stop").returncode == 0
        try:
            with pytest.raises(DatabaseUnavailable):
                store.claim("w1", lease_seconds=LEASE)
        finally:
            assert pgserver.control("start").returncode == 0
        # The pool's connections died with the server: pre-ping replaces them.
        assert store.claim("w1", lease_seconds=LEASE).id == job.id
