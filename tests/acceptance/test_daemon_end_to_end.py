"""The foundation scenario: a real `previewd run` process, a training run written like ai-toolkit
writes it, a request and a broken request in the inbox.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from previewd.instance import EXAMPLE_RUN, render_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_qwen(tiny_model) -> Path:
    return tiny_model("qwen_image_2512")


def _start(config: Path, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "previewd", "run", "-c", str(config), *extra],
                            stdout=handle, stderr=subprocess.STDOUT, env=env)


class NotifyListener(threading.Thread):
    """Stands in for systemd: collects the daemon's sd_notify datagrams."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)
        self.messages: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.messages.extend(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                continue

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sock.close()


def _write_slowly(path: Path, data: bytes, *, chunks: int = 6, pause: float = 0.3,
                  long_pause_after: int = 2, long_pause: float = 2.5) -> None:
    """Write in place in chunks like safetensors' streaming writer, with one stall longer than
    the settle window, so only the header/size check can tell the file is incomplete."""
    size = len(data)
    with open(path, "wb") as handle:
        for i in range(chunks):
            handle.write(data[i * size // chunks:(i + 1) * size // chunks])
            handle.flush()
            time.sleep(long_pause if i == long_pause_after else pause)


def _renders(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*.png") if p.name != "grid.png"]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def test_daemon_renders_run_and_request_once(tmp_path: Path, tiny_qwen: Path) -> None:
    from previewd.pipelines.tiny.qwen import write_random_lora

    config = tmp_path / "config.yaml"
    config.write_text(render_config(tiny_models_dir=str(tiny_qwen.parent), settle_seconds=1,
                                    idle_poll_seconds=0.2))
    inbox, log = tmp_path / "inbox", tmp_path / "daemon.log"
    inbox.mkdir()
    checkpoints = {}
    for step, seed in ((250, 1), (500, 2)):
        staged = write_random_lora(tiny_qwen, tmp_path / "staging" / f"c{step}.safetensors", seed=seed, step=step)
        checkpoints[step] = staged.read_bytes()

    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    proc = _start(config, log, env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock")))
    try:
        run = inbox / "example_lora"
        run.mkdir()
        (run / "config.yaml").write_text(EXAMPLE_RUN.format(training_folder=inbox))
        (run / "samples").mkdir()  # ai-toolkit's own sample of step 250, prompt 0
        Image.new("RGB", (64, 64), (90, 140, 60)).save(run / "samples" / "1724085406830__000000250_0.jpg")
        for step in (250, 500):
            _write_slowly(run / f"example_lora_{step:09d}.safetensors", checkpoints[step])
        (inbox / "good.yaml").write_text(
            "model: qwen_image_2512\ntrigger_word: zx9\n"
            "prompts:\n  - prompt: '[trigger] a lighthouse'\n    width: 64\n    height: 64\n"
            "    sample_steps: 3\n    seed: 5\n"
            "loras:\n  - path: example_lora/example_lora_000000250.safetensors\n    network_multiplier: 0.5\n")
        (inbox / "bad.yaml").write_text(
            "model: qwen_image_2512\nprompts:\n  - prompt: 'x'\n    width: 12\n    colour: red\nloras: []\n")

        previews = run / "previews"
        request_out = tmp_path / "outbox" / "good"
        _wait_for(lambda: len(_renders(previews)) == 4 and len(_renders(request_out)) == 1
                  and (inbox / "bad.yaml.error.txt").exists(), 240, "4 + 1 previews", proc, log)
        _wait_for(lambda: _all_done(config), 60, "the queue to drain", proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
        listener.stop()

    assert listener.messages[0] == "READY=1"
    assert "WATCHDOG=1" in listener.messages and listener.messages[-1] == "STOPPING=1"
    assert any(m.startswith("STATUS=rendering job") for m in listener.messages)

    manifest = json.loads((previews / "manifest.json").read_text())
    seen = sorted((r["step"], r["prompt_index"]) for r in manifest["renders"])
    assert seen == [(250, 0), (250, 1), (500, 0), (500, 1)]
    for render in manifest["renders"]:
        assert (previews / render["image"]).is_file()
        assert render["prompt"].startswith("p3r5on ")  # trigger injected, flags parsed out
        assert (render["width"], render["height"]) == (64, 64)
        assert render["model"] == "qwen_image_2512" and render["parity"] == "aitk"
    by_prompt = {r["prompt_index"]: r for r in manifest["renders"] if r["step"] == 250}
    assert by_prompt[0]["aitk_sample"] == "../samples/1724085406830__000000250_0.jpg"
    assert by_prompt[0]["aitk_sample_diff"]["psnr_db"] > 0 and by_prompt[1]["aitk_sample"] is None
    assert by_prompt[1]["seed"] == 7 and by_prompt[0]["seed"] == 42  # --seed flag; walk_seed base
    assert (previews / "grid.png").is_file() and (previews / "index.html").is_file()

    request_manifest = json.loads((request_out / "manifest.json").read_text())
    [render] = request_manifest["renders"]
    assert render["prompt"] == "zx9 a lighthouse" and render["network_multiplier"] == 0.5

    error = (inbox / "bad.yaml.error.txt").read_text()
    assert "prompts.0.width" in error and "colour" in error
    status = json.loads(subprocess.run([sys.executable, "-m", "previewd", "status", "-c", str(config), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert status["counts"]["done"] == 5 and status["counts"]["failed"] == 0
    assert [r["path"] for r in status["rejected_inputs"]] == [str(inbox / "bad.yaml")]

    before = {p.name: p.stat().st_mtime_ns for p in _renders(previews)}
    restarted = _start(config, log, "--exit-when-idle")
    assert restarted.wait(timeout=120) == 0, log.read_text()[-4000:]
    after = {p.name: p.stat().st_mtime_ns for p in _renders(previews)}
    assert after == before, "a restart rendered something again"
    assert len(json.loads((previews / "manifest.json").read_text())["renders"]) == 4


def _all_done(config: Path) -> bool:
    out = subprocess.run([sys.executable, "-m", "previewd", "status", "-c", str(config), "--json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return False
    counts = json.loads(out.stdout)["counts"]
    return counts.get("queued", 0) == 0 and counts.get("running", 0) == 0


def test_readme_demo_renders_example(tmp_path: Path) -> None:
    """The README's first command: init a CPU demo, run until idle, previews appear."""
    env = dict(os.environ)
    demo = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "previewd", "init", str(demo), "--tiny", "--example"],
                   check=True, env=env, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "previewd", "run", "-c", str(demo / "config.yaml"),
                           "--exit-when-idle"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(_renders(demo / "inbox" / "example_lora" / "previews")) == 4
    assert len(_renders(demo / "outbox" / "example_request")) == 1
    # A log captured off a terminal: no progress bars or escape codes, each event said once.
    assert "\x1b" not in done.stderr and "\r" not in done.stderr and "it/s" not in done.stderr
    events = [line.split(" ", 2)[-1] for line in done.stderr.splitlines()]  # without the timestamp
    assert len(events) == len(set(events)), [e for e in events if events.count(e) > 1]


def test_a_killed_daemon_finishes_every_job_exactly_once(tmp_path: Path, tiny_qwen: Path) -> None:
    """kill -9 in the middle of a render; a new daemon takes the job up once its lease expires."""
    from previewd.config import load_config
    from previewd.queue import JobState, JobStore

    config = tmp_path / "config.yaml"
    config.write_text(render_config(tiny_models_dir=str(tiny_qwen.parent), settle_seconds=0.5,
                                    idle_poll_seconds=0.2).replace("lease_seconds: 300", "lease_seconds: 3")
                      .replace("heartbeat_seconds: 10", "heartbeat_seconds: 0.5"))
    inbox, log = tmp_path / "inbox", tmp_path / "daemon.log"
    inbox.mkdir()
    (inbox / "slow.yaml").write_text(
        "model: qwen_image_2512\nprompts:\n"
        + "".join(f"  - prompt: 'a lighthouse number {i}'\n    width: 64\n    height: 64\n    sample_steps: 150\n"
                  for i in range(2)))
    store = JobStore(load_config(config).db_url)
    proc = _start(config, log)
    try:
        def running() -> bool:
            try:
                return any((job.progress or 0) > 0 for job in store.list_jobs(states=[JobState.RUNNING]))
            except Exception:  # the daemon may not have created the schema yet
                return False
        _wait_for(running, 120, "a job to be mid-render", proc, log)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    [killed] = store.list_jobs(states=[JobState.RUNNING])

    restarted = _start(config, log, "--exit-when-idle")
    assert restarted.wait(timeout=300) == 0, log.read_text()[-4000:]
    jobs = store.list_jobs()
    assert [job.state for job in jobs] == [JobState.DONE, JobState.DONE]
    assert store.get(killed.id).attempts == 2
    path = [event.to_state for event in store.events(killed.id)]
    assert path == [JobState.QUEUED, JobState.RUNNING, JobState.QUEUED, JobState.RUNNING, JobState.DONE]
    store.close()
    manifest = json.loads((tmp_path / "outbox" / "slow" / "manifest.json").read_text())
    assert sorted(r["prompt_index"] for r in manifest["renders"]) == [0, 1]
    assert len(_renders(tmp_path / "outbox" / "slow")) == 2


def test_render_command_renders_one_request_without_the_daemon(tmp_path: Path, tiny_qwen: Path) -> None:
    from previewd.pipelines.tiny.qwen import write_random_lora

    config = tmp_path / "config.yaml"
    config.write_text(render_config(tiny_models_dir=str(tiny_qwen.parent)))
    # `render` is the user's own command: it may read files outside the inbox.
    lora = write_random_lora(tiny_qwen, tmp_path / "anywhere" / "mine_000000750.safetensors", seed=3, step=750)
    request = tmp_path / "anywhere" / "one.yaml"
    request.write_text(f"model: qwen_image_2512\nprompts:\n  - prompt: a cat\n    width: 64\n    height: 64\n"
                       f"    sample_steps: 2\n  - prompt: a dog\n    width: 64\n    height: 64\n    sample_steps: 2\n"
                       f"loras:\n  - path: {lora}\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "previewd", "render", "-c", str(config), str(request),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == [str(out / "000000750_00.png"), str(out / "000000750_01.png")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["prompt"] for r in manifest["renders"]] == ["a cat", "a dog"]
    assert all(r["step"] == 750 and r["checkpoint"] == "mine_000000750.safetensors" for r in manifest["renders"])
    assert not (tmp_path / "state" / "previewd.db").exists(), "render must not touch the queue"

    request.write_text("model: qwen_image_2512\nprompts: []\n")
    failed = subprocess.run([sys.executable, "-m", "previewd", "render", "-c", str(config), str(request)],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "prompts" in failed.stderr


def test_two_workers_share_one_queue_and_render_each_image_once(tmp_path: Path, tiny_qwen: Path) -> None:
    """Scale-out on one host: two daemons on one config (one per GPU) watch the same inbox."""
    from previewd.config import load_config
    from previewd.pipelines.tiny.qwen import write_random_lora
    from previewd.queue import JobState, JobStore

    config = tmp_path / "config.yaml"
    config.write_text(render_config(tiny_models_dir=str(tiny_qwen.parent), settle_seconds=0.5,
                                    idle_poll_seconds=0.2))
    inbox = tmp_path / "inbox"
    run = inbox / "example_lora"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(EXAMPLE_RUN.format(training_folder=inbox).replace(
        "sample_steps: 4", "sample_steps: 30"))
    for step in (250, 500, 750):
        write_random_lora(tiny_qwen, run / f"example_lora_{step:09d}.safetensors", seed=step, step=step)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [_start(config, log, "--exit-when-idle") for log in logs]
    for worker, log in zip(workers, logs):
        assert worker.wait(timeout=300) == 0, log.read_text()[-4000:]

    with JobStore(load_config(config).db_url) as store:
        jobs = store.list_jobs()
        assert len(jobs) == 6 and {job.state for job in jobs} == {JobState.DONE}
        for job in jobs:
            claims = [e for e in store.events(job.id) if e.to_state == JobState.RUNNING]
            assert len(claims) == 1, f"job {job.id} was claimed {len(claims)} times"
    manifest = json.loads((run / "previews" / "manifest.json").read_text())
    assert sorted((r["step"], r["prompt_index"]) for r in manifest["renders"]) == [
        (step, i) for step in (250, 500, 750) for i in (0, 1)]


_STUCK_DAEMON = """
import logging, sys, time
from pathlib import Path
from previewd.config import load_config
from previewd.worker import Renderer
from previewd.service import Service
from previewd.tasks import OutputTarget, RenderTask
from previewd.spec import RenderSpec
from previewd.queue import JobStore

class StuckPipeline:  # a model load that cannot be interrupted
    device = "cpu"
    def __init__(self, *args, **kwargs): pass
    def load(self): time.sleep(120)
    def unload(self): pass

logging.basicConfig(level=logging.INFO)
config = load_config(sys.argv[1])
config.state_dir.mkdir(parents=True, exist_ok=True)
with JobStore(config.db_url) as store:
    store.create_schema()
    task = RenderTask(spec=RenderSpec(model="flux2", prompt="x"),
                      target=OutputTarget(out_dir=str(config.outbox_root), image_name="x.png", title="t",
                                          source="s", prompt_index=0))
    store.enqueue(key="k", payload=task.model_dump(mode="json"), model="flux2", group="g")
sys.exit(Service(config, renderer=Renderer(config, factory=StuckPipeline)).run())
"""


def test_stop_request_has_a_time_limit(tmp_path: Path) -> None:
    """SIGTERM while a model loads (not interruptible): exit after worker.shutdown_timeout_seconds."""
    from previewd.config import load_config
    from previewd.queue import JobState, JobStore

    config = tmp_path / "config.yaml"
    config.write_text(render_config(idle_poll_seconds=0.2).replace("shutdown_timeout_seconds: 30",
                                                                   "shutdown_timeout_seconds: 1"))
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_DAEMON, str(config)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    db = load_config(config).db_url

    def claimed() -> bool:
        try:
            with JobStore(db) as store:
                return bool(store.list_jobs(states=[JobState.RUNNING]))
        except Exception:  # the schema may not exist yet
            return False

    _wait_for(claimed, 60, "the job to be claimed", proc, log)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 1
    assert time.monotonic() - started < 10
    assert "exiting now" in log.read_text()


def test_chores_go_on_while_a_model_loads_and_a_second_signal_quits_at_once(tmp_path: Path) -> None:
    """The worker's heartbeat and the job's lease are renewed during an uninterruptible load;
    a second SIGTERM exits without waiting for the time limit."""
    from previewd.config import load_config
    from previewd.queue import JobState, JobStore

    config = tmp_path / "config.yaml"
    config.write_text(render_config(idle_poll_seconds=0.2).replace("heartbeat_seconds: 10", "heartbeat_seconds: 0.2"))
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_DAEMON, str(config)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    db = load_config(config).db_url

    def beats():
        try:
            with JobStore(db) as store:
                running = store.list_jobs(states=[JobState.RUNNING])
                workers = store.workers()
        except Exception:  # the schema may not exist yet
            return None
        if not running or not workers:
            return None
        return workers[0].last_heartbeat, running[0].lease_expires_at

    _wait_for(lambda: beats() is not None, 60, "the job to be claimed", proc, log)
    first = beats()
    _wait_for(lambda: all(later > earlier for later, earlier in zip(beats(), first)), 20,
              "heartbeat and lease renewal during the load", proc, log)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    text = log.read_text()
    assert "SIGTERM: finishing the current step" in text and "a second signal: exiting now" in text
