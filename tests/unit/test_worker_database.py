"""The worker and the daemon when the database goes away, and with jobs whose files the worker
cannot read (stand-in pipeline; daemons against a real restarting PostgreSQL are in
tests/acceptance/test_multi_worker.py)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image

from previewd.config import load_config
from previewd.errors import JobStateError
from previewd.inbox import Outcome
from previewd.instance import render_config
from previewd.queue import DatabaseUnavailable, JobState, JobStore
from previewd.service import Service
from previewd.spec import LoraSpec, RenderResult, RenderSpec
from previewd.tasks import OutputTarget, RenderTask
from previewd.worker import Renderer, Worker


class Clock:
    def __init__(self):
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


class Outage:
    """The store, whose database is down for the methods in `down`."""

    def __init__(self, store: JobStore):
        self.store = store
        self.down: set[str] = set()
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def call(*args, **kwargs):
            self.calls[name] += 1
            if name in self.down:
                raise DatabaseUnavailable("database unreachable: server closed the connection")
            return method(*args, **kwargs)
        return call


class Pipeline:
    """A stand-in pipeline; `during_render` runs while the image is being made."""

    during_render = staticmethod(lambda: None)

    def __init__(self, model_id, source, *, device, dtype, quantization=None):
        self.device = "cpu"

    def load(self):
        pass

    def render(self, spec, *, on_step=None, should_stop=None):
        Pipeline.during_render()
        return RenderResult(image=Image.new("RGB", (spec.width, spec.height)), seed=spec.seed,
                            width=spec.width, height=spec.height)

    def unload(self):
        pass


@pytest.fixture
def env(tmp_path):
    Pipeline.during_render = staticmethod(lambda: None)
    (tmp_path / "config.yaml").write_text(render_config())
    config = load_config(tmp_path / "config.yaml")
    config.state_dir.mkdir()
    clock = Clock()
    store = JobStore(config.db_url, clock=clock)
    store.create_schema()
    outage = Outage(store)
    yield config, store, outage, Worker(outage, Renderer(config, factory=Pipeline), config, "w1"), clock
    store.close()


def _enqueue(config, store, lora: str | None = None):
    spec = RenderSpec(model="flux2", prompt="p", width=64, height=64,
                      lora=LoraSpec(path=lora, sha256="ab" * 32) if lora else None)
    task = RenderTask(spec=spec, target=OutputTarget(out_dir=str(config.outbox_root), image_name="0.png",
                                                     title="t", source="s", prompt_index=0))
    return store.enqueue(key=task.idempotency_key(), payload=task.model_dump(mode="json"), model="flux2",
                         group="g")[0]


def _later(seconds: float, action) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()


def test_a_render_finished_during_an_outage_is_recorded_once_the_database_is_back(env, caplog):
    config, store, outage, worker, _clock = env
    job = _enqueue(config, store)

    def server_restarts():
        outage.down = {"finish", "heartbeat"}
        _later(0.5, outage.down.clear)

    Pipeline.during_render = server_restarts
    with caplog.at_level(logging.INFO, logger="previewd.worker"):
        assert worker.run_once(threading.Event())
    done = store.get(job.id)
    assert done.state is JobState.DONE and done.result["image"].endswith("0.png")
    assert outage.calls["finish"] >= 2
    assert (config.outbox_root / "0.png").is_file()
    assert "keeping its outcome until the database is back" in caplog.text
    assert "recorded after the database came back" in caplog.text
    assert not any(record.exc_info for record in caplog.records)


def test_a_job_whose_lease_lapsed_during_the_outage_is_left_to_its_new_worker(env, caplog):
    config, store, outage, worker, clock = env
    job = _enqueue(config, store)

    def cut_off_past_the_lease():
        outage.down = {"finish"}
        clock.now += timedelta(seconds=config.worker.lease_seconds + 1)
        store.requeue_expired()  # another daemon, which could reach the database
        store.claim("w2", lease_seconds=config.worker.lease_seconds)
        _later(0.3, outage.down.clear)

    Pipeline.during_render = cut_off_past_the_lease
    with caplog.at_level(logging.INFO, logger="previewd.worker"):
        assert worker.run_once(threading.Event())
    running = store.get(job.id)
    assert (running.state, running.worker_id) == (JobState.RUNNING, "w2")
    assert "rendered, but no longer ours to finish" in caplog.text
    with pytest.raises(JobStateError):
        store.finish(job.id, "w1", {})


def test_a_claim_during_an_outage_raises_for_the_main_loop_to_back_off(env):
    config, store, outage, worker, _clock = env
    _enqueue(config, store)
    outage.down = {"claim"}
    with pytest.raises(DatabaseUnavailable):
        worker.run_once(threading.Event())
    outage.down.clear()
    assert worker.run_once(threading.Event())


def test_a_job_whose_files_this_host_cannot_read_is_left_to_others(env, tmp_path, caplog):
    config, store, _outage, worker, _clock = env
    missing = tmp_path / "elsewhere" / "snapshot.safetensors"
    job = _enqueue(config, store, lora=str(missing))
    with caplog.at_level(logging.WARNING, logger="previewd.worker"):
        assert worker.run_once(threading.Event())
    queued = store.get(job.id)
    assert (queued.state, queued.attempts) == (JobState.QUEUED, 0)
    assert f"cannot read {missing}" in queued.last_error and f"cannot read {missing} on this host" in caplog.text
    [mark] = store.unreadable()
    assert (mark.job_id, mark.worker_id, mark.path) == (job.id, "w1", str(missing))
    # No claim loop: this worker passes over it, another one takes it.
    assert not worker.run_once(threading.Event())
    assert store.outstanding("w1") == 0
    assert store.claim("w2", lease_seconds=60).id == job.id


@pytest.fixture
def unreachable(tmp_path, monkeypatch):
    """A daemon whose database cannot be opened, and the systemd messages it sends."""
    (tmp_path / "config.yaml").write_text(render_config().replace(
        "database_url:\n", f"database_url: sqlite:///{tmp_path / 'gone' / 'q.db'}\n"))
    sent = []
    monkeypatch.setattr("previewd.service.notify", lambda *states: sent.extend(states))
    config = load_config(tmp_path / "config.yaml")
    service = Service(config, renderer=Renderer(config, factory=Pipeline))
    yield service, sent
    service._store.close()


def test_intake_waits_for_the_database_instead_of_dropping_the_file(unreachable, tmp_path, caplog):
    service, _sent = unreachable
    service.config.inbox.mkdir()
    request = service.config.inbox / "r.yaml"
    request.write_text("model: flux2\nprompts:\n  - prompt: a\n    width: 64\n    height: 64\n")
    with caplog.at_level(logging.WARNING, logger="previewd.service"):
        assert service._intake(request) is Outcome.RETRY  # "not handled": the watcher delivers it again
    assert "database unreachable" in caplog.text and not any(r.exc_info for r in caplog.records)


def test_the_watchdog_is_fed_while_the_database_is_away(unreachable):
    service, sent = unreachable
    service._ping_watchdog()
    assert sent == ["WATCHDOG=1", "STATUS=idle; database unreachable"]


def test_start_up_waits_for_the_database_and_tells_systemd(unreachable):
    service, sent = unreachable
    waiting = threading.Thread(target=service._connect)
    waiting.start()
    _later(0.5, service.should_exit.set)
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    assert sent[0].startswith("STATUS=waiting for the database (database unreachable: unable to open")
    assert sent[1].startswith("EXTEND_TIMEOUT_USEC=")
