"""Several daemons on one queue, end to end, as a user runs them.

Four `previewd run` processes start at the same instant on a fresh database (systemd starting
one per GPU after a reboot) and render a 10-checkpoint x 3-prompt training run exactly once. One
is SIGKILLed mid-render; another finishes its job after the lease. None logs a traceback, and
the schema is migrated by exactly one of them. On PostgreSQL (PREVIEWD_TEST_PG_URL, started by
.ci/run) the server is also stopped and started again mid-run, and every daemon carries on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pgserver
from previewd.queue import JobState, JobStore
from previewd.queue.migrate import script_directory

pytestmark = pytest.mark.slow

CHECKPOINTS, PROMPTS, DAEMONS = 10, 3, 4
LEASE = 10.0
"""Long enough to outlive the server restart below, short enough to wait for once."""
HEAD = script_directory().get_current_head()

RUN = """\
job: extension
config:
  name: mw
  process:
    - type: sd_trainer
      training_folder: {training_folder}
      trigger_word: zq7
      network: {{type: lora, linear: 4, linear_alpha: 4}}
      save: {{dtype: bf16, save_every: 100}}
      model: {{name_or_path: Qwen/Qwen-Image-2512, arch: "qwen_image:2512"}}
      sample:
        sampler: flowmatch
        width: 64
        height: 64
        prompts:
          - "[trigger] a red fox in snow"
          - "[trigger] a lighthouse at dusk"
          - "[trigger] a bowl of lemons"
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 40
"""


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "previewd", "tiny-models", str(root), "--model", "qwen_image_2512"],
                   check=True, capture_output=True, timeout=600)
    return root / "qwen_image_2512"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    if request.param == "sqlite":
        yield None  # the default: state_dir/previewd.db
        return
    if not pgserver.PG_URL:
        pytest.skip("set PREVIEWD_TEST_PG_URL to run against PostgreSQL")
    if pgserver.control("status").returncode == 4:
        pytest.skip("the test server was not started by .ci/postgres.sh: it cannot be restarted")
    with pgserver.fresh_database() as url:
        yield url


def _config(tmp_path: Path, models: Path, database_url: str | None) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
inbox: ./inbox
state_dir: ./state
database_url: {database_url or ""}
outbox_root: ./outbox
device: cpu
watch:
  settle_seconds: 0.5
worker:
  lease_seconds: {LEASE}
  heartbeat_seconds: 0.5
  idle_poll_seconds: 0.2
models:
  qwen_image_2512:
    path: {models}
""")
    return config


def _training_run(inbox: Path, models: Path) -> Path:
    from previewd.pipelines.tiny.qwen import write_random_lora

    run = inbox / "mw"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(RUN.format(training_folder=inbox))
    for n in range(1, CHECKPOINTS + 1):
        write_random_lora(models, run / f"mw_{n * 100:09d}.safetensors", seed=n, step=n * 100)
    return run


class Daemons:
    def __init__(self, config: Path, logs: Path):
        self.config, self.logs = config, logs
        # One torch thread each: four daemons share this machine's cores, as they would a host's CPUs.
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.procs = [subprocess.Popen([sys.executable, "-m", "previewd", "run", "-c", str(config), "--exit-when-idle"],
                                       stdout=open(self.log(i), "wb"), stderr=subprocess.STDOUT, env=env)
                      for i in range(DAEMONS)]

    def log(self, i: int) -> Path:
        return self.logs / f"daemon{i}.log"

    def tails(self) -> str:
        return "\n".join(f"--- daemon {i} (pid {p.pid}, rc {p.poll()}):\n{self.log(i).read_text()[-3000:]}"
                         for i, p in enumerate(self.procs))

    def wait_for(self, predicate, what: str, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = predicate()
            except Exception:  # noqa: BLE001 - the schema may not exist yet, or the server is restarting
                found = None
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.tails()}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _status(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "previewd", "status", "-c", str(config), "--json"],
                          capture_output=True, text=True, timeout=120)


def test_four_daemons_started_together_render_every_image_once(tmp_path, tiny_qwen, database_url):
    config = _config(tmp_path, tiny_qwen, database_url)
    run = _training_run(tmp_path / "inbox", tiny_qwen)
    store = JobStore(database_url or f"sqlite:///{tmp_path / 'state' / 'previewd.db'}")
    (tmp_path / "state").mkdir()
    daemons = Daemons(config, tmp_path)
    try:
        # SIGKILL a daemon while it renders, early in its job so it cannot finish it first.
        victim_job = daemons.wait_for(lambda: next(
            (job for job in store.list_jobs(states=[JobState.RUNNING]) if 0 < (job.progress or 0) <= 0.5), None),
            "a job to be mid-render")
        pid = int(victim_job.worker_id.split(":")[1])
        [victim] = [i for i, proc in enumerate(daemons.procs) if proc.pid == pid]
        daemons.procs[victim].kill()
        daemons.procs[victim].wait()
        survivors = [i for i in range(DAEMONS) if i != victim]

        if database_url:
            daemons.wait_for(lambda: store.counts()[JobState.DONE] >= 12, "a third of the images")
            assert pgserver.control("stop").returncode == 0
            down = _status(config)
            time.sleep(2)
            assert pgserver.control("start").returncode == 0
            restarted_at = daemons.wait_for(store.now, "the server to accept connections again")
            assert down.returncode == 1, down.stdout + down.stderr
            assert json.loads(down.stdout)["database"]["reachable"] is False
            assert store.counts()[JobState.DONE] < CHECKPOINTS * PROMPTS

        for i in survivors:
            try:
                assert daemons.procs[i].wait(timeout=600) == 0, daemons.tails()
            except subprocess.TimeoutExpired:
                raise AssertionError(f"daemon {i} did not finish:\n{daemons.tails()}") from None
    finally:
        daemons.stop()

    jobs = store.list_jobs()
    assert len(jobs) == CHECKPOINTS * PROMPTS and {job.state for job in jobs} == {JobState.DONE}, daemons.tails()
    victim_id = victim_job.worker_id
    for job in jobs:
        claims = [e.worker_id for e in store.events(job.id) if e.to_state is JobState.RUNNING]
        if job.id != victim_job.id:
            assert len(claims) == 1, f"job {job.id} was claimed by {claims}"
    events = store.events(victim_job.id)
    assert [e.to_state for e in events] == [JobState.QUEUED, JobState.RUNNING, JobState.QUEUED,
                                            JobState.RUNNING, JobState.DONE]
    assert events[1].worker_id == victim_id and f"worker {victim_id} vanished" in events[2].message
    assert events[4].worker_id not in (None, victim_id)

    manifest = json.loads((run / "previews" / "manifest.json").read_text())
    assert sorted((r["step"], r["prompt_index"]) for r in manifest["renders"]) == [
        (n * 100, i) for n in range(1, CHECKPOINTS + 1) for i in range(PROMPTS)]
    assert len([p for p in (run / "previews").glob("*.png") if p.name != "grid.png"]) == CHECKPOINTS * PROMPTS

    logs = [daemons.log(i).read_text() for i in range(DAEMONS)]
    assert not any("Traceback" in log for log in logs), daemons.tails()
    upgrades = [log.count(f"queue schema upgraded from nothing to {HEAD}") for log in logs]
    at_head = [log.count(f"queue schema at {HEAD} (head)") for log in logs]
    assert sorted(upgrades) == [0] * (DAEMONS - 1) + [1] and sum(at_head) == DAEMONS - 1, daemons.tails()

    if database_url:
        finished_after = {e.worker_id for job in jobs for e in store.events(job.id)
                          if e.to_state is JobState.DONE and e.at > restarted_at}
        survivor_ids = {e.worker_id for job in jobs for e in store.events(job.id)} - {victim_id, None}
        assert finished_after == survivor_ids, "a daemon stopped working after the database restart"
        for i in survivors:
            assert "database unreachable" in logs[i] and "database reachable again" in logs[i], daemons.tails()

    status = _status(config)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["database"] == {"reachable": True, "schema": HEAD}
    # The survivors unregistered on exit; the killed one was marked gone by them.
    assert [(w["id"], w["state"], w["device"]) for w in report["workers"]] == [(victim_id, "gone", "cpu")]
    store.close()
