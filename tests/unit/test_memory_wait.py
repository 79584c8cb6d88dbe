"""Sharing the GPU with training, on the worker side: the free-memory gate waits for the plan's bytes,
logs changes rather than polls, stops at once when asked, keeps the systemd watchdog fed; an idle
pipeline is unloaded; an out-of-memory error really lets go of the pipeline; jobs of one checkpoint
and multiplier are claimed together. The device is simulated (free_bytes is replaced)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from previewd.config import load_config
from previewd.dispatch import lora_affinity
from previewd.errors import PipelineOutOfMemory, RenderInterrupted
from previewd.instance import render_config
from previewd.pipelines import device as devices
from previewd.queue import JobState, JobStore
from previewd.spec import LoraSpec, RenderResult, RenderSpec
from previewd.tasks import OutputTarget, RenderTask
from previewd.worker import Renderer, Worker

GiB = 2 ** 30


@dataclass
class FakePlan:
    peak_bytes: int
    fits: bool = True

    def summary(self) -> str:
        return f"stand-in plan, peak {self.peak_bytes / GiB:.1f} GiB"


class OnGpu:
    """A stand-in pipeline on a (simulated) CUDA device whose plan needs `peak` bytes."""

    peak = 10 * GiB
    instances: list["OnGpu"] = []

    def __init__(self, model_id, source, *, device, dtype, quantization=None):
        self.model_id, self.device, self.loaded, self.renders = model_id, "cuda:0", False, []
        OnGpu.instances.append(self)

    def plan_memory(self, memory, lora_path):
        return FakePlan(self.peak)

    def load(self):
        self.loaded = True

    def render(self, spec, *, on_step=None, should_stop=None):
        self.renders.append(spec)
        return RenderResult(image=Image.new("RGB", (spec.width, spec.height)), seed=spec.seed, width=spec.width,
                            height=spec.height)

    def unload(self):
        self.loaded = False


def _config(tmp_path, **replace):
    text = render_config(idle_poll_seconds=0.05)
    for old, new in replace.items():
        text = text.replace(old, new)
    (tmp_path / "config.yaml").write_text(text)
    config = load_config(tmp_path / "config.yaml")
    config.state_dir.mkdir(exist_ok=True)
    return config


def _task(config, index=0, lora=None) -> RenderTask:
    return RenderTask(spec=RenderSpec(model="flux2", prompt=f"p{index}", width=64, height=64, lora=lora),
                      target=OutputTarget(out_dir=str(config.outbox_root), image_name=f"{index}.png", title="t",
                                          source="s", prompt_index=index))


@pytest.fixture(autouse=True)
def _fresh():
    OnGpu.instances = []


def test_the_gate_waits_for_the_plans_bytes_and_logs_each_change_once(tmp_path, monkeypatch, caplog):
    config = _config(tmp_path)
    readings = iter([2, 2, 2, 2, 5, 5, 5, 12])
    polls = []

    def free(device):
        polls.append(device)
        return next(readings) * GiB

    monkeypatch.setattr(devices, "free_bytes", free)
    caplog.set_level(logging.INFO, logger="previewd.worker")
    renderer = Renderer(config, factory=OnGpu)
    renderer.render(_task(config))
    assert OnGpu.instances[0].loaded and len(polls) == 8
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert waits == ["waiting for 10.0 GiB free on cuda:0 (2.0 GiB free)",
                     "waiting for 10.0 GiB free on cuda:0 (5.0 GiB free)"]
    assert any("12.0 GiB free on cuda:0: loading" in r.getMessage() for r in caplog.records)


def test_the_configured_floor_still_applies_above_a_smaller_plan(tmp_path, monkeypatch):
    config = _config(tmp_path, **{"min_free_vram_gb: 0": "min_free_vram_gb: 20"})
    readings = iter([12, 19, 21])
    monkeypatch.setattr(devices, "free_bytes", lambda device: next(readings) * GiB)
    Renderer(config, factory=OnGpu).render(_task(config))
    assert OnGpu.instances[0].loaded


def test_a_stop_request_ends_the_wait_at_once(tmp_path, monkeypatch):
    config = _config(tmp_path, **{"idle_poll_seconds: 0.05": "idle_poll_seconds: 30"})
    monkeypatch.setattr(devices, "free_bytes", lambda device: GiB)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RenderInterrupted, match="waiting for 10.0 GiB"):
        Renderer(config, factory=OnGpu).render(_task(config), should_stop=stop.is_set)
    assert time.monotonic() - started < 1.5
    assert not OnGpu.instances[0].loaded


def test_a_job_stopped_while_waiting_goes_back_to_the_queue(tmp_path, monkeypatch):
    config = _config(tmp_path)
    monkeypatch.setattr(devices, "free_bytes", lambda device: GiB)
    with JobStore(config.db_url) as store:
        store.create_schema()
        task = _task(config)
        job, _ = store.enqueue(key="k", payload=task.model_dump(mode="json"), model="flux2", group="g")
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        assert Worker(store, Renderer(config, factory=OnGpu), config, "w1").run_once(stop)
        job = store.get(job.id)
        assert job.state == JobState.QUEUED and job.attempts == 0


def test_an_idle_pipeline_is_released_after_the_configured_time(tmp_path, monkeypatch):
    config = _config(tmp_path, **{"idle_release_minutes: 0": "idle_release_minutes: 0.005"})
    monkeypatch.setattr(devices, "free_bytes", lambda device: 80 * GiB)
    with JobStore(config.db_url) as store:
        store.create_schema()
        task = _task(config)
        store.enqueue(key="k", payload=task.model_dump(mode="json"), model="flux2", group="g")
        renderer = Renderer(config, factory=OnGpu)
        worker = Worker(store, renderer, config, "w1")
        assert worker.run_once(threading.Event())
        assert not worker.run_once(threading.Event())  # idle, but not yet for long
        assert renderer.model == "flux2" and OnGpu.instances[0].loaded
        time.sleep(0.4)
        assert not worker.run_once(threading.Event())
        assert renderer.model is None and not OnGpu.instances[0].loaded


def test_no_idle_release_by_default(tmp_path, monkeypatch):
    config = _config(tmp_path)
    monkeypatch.setattr(devices, "free_bytes", lambda device: 80 * GiB)
    renderer = Renderer(config, factory=OnGpu)
    renderer.render(_task(config))
    renderer._last_used -= 10 * 86400
    assert not renderer.release_if_idle() and OnGpu.instances[0].loaded


class RunsOutOfMemory(OnGpu):
    """Fails mid-render the way torch does, through the adapters' own conversion."""

    def render(self, spec, *, on_step=None, should_stop=None):
        activations = torch.zeros(1024)  # noqa: F841 - what a failed step leaves in its frames
        with devices.raise_oom_as(self.model_id, self.device):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_lets_go_of_the_pipeline(tmp_path, monkeypatch):
    config = _config(tmp_path)
    monkeypatch.setattr(devices, "free_bytes", lambda device: 80 * GiB)
    renderer = Renderer(config, factory=RunsOutOfMemory)
    with pytest.raises(PipelineOutOfMemory, match="out of memory on cuda:0") as raised:
        renderer.render(_task(config))
    pipeline = weakref.ref(OnGpu.instances.pop())
    # The exception the caller holds must not reach the pipeline through any frame or context.
    assert raised.value.__context__ is None and raised.value.__cause__ is None
    gc.collect()
    assert pipeline() is None and renderer.model is None


def test_jobs_of_one_checkpoint_and_multiplier_are_claimed_together(tmp_path, monkeypatch):
    config = _config(tmp_path)
    monkeypatch.setattr(devices, "free_bytes", lambda device: 80 * GiB)
    with JobStore(config.db_url) as store:
        store.create_schema()
        for name in ("a", "b"):
            (tmp_path / f"{name}.safetensors").write_bytes(b"stand-in")
        index = 0
        for prompt in range(3):
            for sha in ("a" * 64, "b" * 64):
                for multiplier in (1.0, 0.5):
                    lora = LoraSpec(path=str(tmp_path / f"{sha[0]}.safetensors"), sha256=sha,
                                    network_multiplier=multiplier)
                    task = _task(config, index, lora)
                    store.enqueue(key=str(index), payload=task.model_dump(mode="json"), model="flux2", group="g",
                                  affinity=lora_affinity(task.spec))
                    index += 1
        worker = Worker(store, Renderer(config, factory=OnGpu), config, "w1")
        while worker.run_once(threading.Event()):
            pass
    order = [(s.lora.sha256[0], s.lora.network_multiplier) for s in OnGpu.instances[0].renders]
    switches = sum(1 for before, after in zip(order, order[1:]) if before != after)
    assert len(order) == 12 and switches == 3, order


_WAITING_DAEMON = """
import logging, sys
from previewd.config import load_config
from previewd.pipelines import device as devices
from previewd.queue import JobStore
from previewd.service import Service
from previewd.spec import RenderSpec
from previewd.tasks import OutputTarget, RenderTask
from previewd.worker import Renderer

class Plan:
    peak_bytes, fits = 40 * 2**30, True
    def summary(self): return "stand-in plan, peak 40 GiB"

class OnGpu:  # a model whose plan needs more than the (simulated) GPU has free
    device = "cuda:0"
    def __init__(self, *args, **kwargs): pass
    def plan_memory(self, memory, lora_path): return Plan()
    def load(self): raise AssertionError("loaded without the memory")
    def unload(self): pass

devices.free_bytes = lambda device: 3 * 2**30  # training holds the rest
logging.basicConfig(level=logging.INFO)
config = load_config(sys.argv[1])
config.state_dir.mkdir(parents=True, exist_ok=True)
with JobStore(config.db_url) as store:
    store.create_schema()
    task = RenderTask(spec=RenderSpec(model="flux2", prompt="x"),
                      target=OutputTarget(out_dir=str(config.outbox_root), image_name="x.png", title="t",
                                          source="s", prompt_index=0))
    store.enqueue(key="k", payload=task.model_dump(mode="json"), model="flux2", group="g")
sys.exit(Service(config, renderer=Renderer(config, factory=OnGpu)).run())
"""


@pytest.mark.slow
def test_a_daemon_waiting_for_memory_feeds_the_watchdog_and_stops_on_sigterm(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(render_config(idle_poll_seconds=0.2))
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-c", _WAITING_DAEMON, str(config)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, NOTIFY_SOCKET=str(sock_path)))
    try:
        deadline = time.monotonic() + 60
        while "waiting for 40.0 GiB" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        pings, started = 0, time.monotonic()
        while time.monotonic() - started < 4:
            try:
                pings += sock.recv(4096).decode().split("\n").count("WATCHDOG=1")
            except TimeoutError:
                continue
        assert pings >= 3
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 3
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    text = log.read_text()
    assert text.count("waiting for 40.0 GiB") == 1, text
    assert "interrupted by shutdown, returned to the queue" in text
    from previewd.config import load_config as load

    with JobStore(load(config).db_url) as store:
        (job,) = store.list_jobs()
        assert job.state == JobState.QUEUED and job.attempts == 0
