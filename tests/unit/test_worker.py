"""Worker and Renderer with a stand-in pipeline: the queue side of rendering (the real
pipelines are exercised in tests/pipelines and tests/acceptance)."""

import threading
import time

import pytest
from PIL import Image

from previewd.config import load_config
from previewd.errors import LoraError, PipelineOutOfMemory, RenderInterrupted
from previewd.instance import render_config
from previewd.queue import JobState, JobStore
from previewd.worker import Renderer, Worker
from previewd.spec import RenderResult, RenderSpec
from previewd.tasks import OutputTarget, RenderTask


class StandIn:
    """Records calls; `fail_with` makes the next render raise."""

    instances: list["StandIn"] = []
    fail_with: BaseException | None = None

    def __init__(self, model_id, source, *, device, dtype, quantization=None):
        self.model_id, self.device, self.loads, self.unloaded = model_id, "cpu", 0, False
        self.source, self.quantization = source, quantization
        StandIn.instances.append(self)

    def load(self):
        self.loads += 1

    def render(self, spec, *, on_step=None, should_stop=None):
        if StandIn.fail_with is not None:
            exc, StandIn.fail_with = StandIn.fail_with, None
            raise exc
        on_step and on_step(1, 1)
        return RenderResult(image=Image.new("RGB", (spec.width, spec.height)), seed=spec.seed,
                            width=spec.width, height=spec.height, record={"stand_in": True})

    def unload(self):
        self.unloaded = True


@pytest.fixture
def env(tmp_path):
    StandIn.instances, StandIn.fail_with = [], None
    (tmp_path / "config.yaml").write_text(render_config())
    config = load_config(tmp_path / "config.yaml")
    config.state_dir.mkdir()
    config.inbox.mkdir()
    store = JobStore(config.db_url)
    store.create_schema()
    renderer = Renderer(config, factory=StandIn)
    yield config, store, renderer, Worker(store, renderer, config, "w1")
    store.close()


def _enqueue(config, store, model: str, index: int):
    task = RenderTask(spec=RenderSpec(model=model, prompt=f"p{index}", width=64, height=64),
                      target=OutputTarget(out_dir=str(config.outbox_root / model), image_name=f"{index}.png",
                                          title="t", source=str(config.inbox / "r.yaml"), prompt_index=index))
    return store.enqueue(key=task.idempotency_key(), payload=task.model_dump(mode="json"), model=model, group="g")[0]


def test_jobs_for_the_loaded_model_go_first_and_models_load_once(env):
    config, store, renderer, worker = env
    for i, model in enumerate(["flux2", "qwen_image_2512", "flux2", "qwen_image_2512"]):
        _enqueue(config, store, model, i)
    stop = threading.Event()
    while worker.run_once(stop):
        pass
    assert [s.model_id for s in StandIn.instances] == ["flux2", "qwen_image_2512"]
    assert StandIn.instances[0].unloaded and all(s.loads == 1 for s in StandIn.instances)
    assert {j.state for j in store.list_jobs()} == {JobState.DONE}
    assert (config.outbox_root / "flux2" / "2.png").is_file()


def test_permanent_failure_fails_the_job_with_its_message(env):
    config, store, _renderer, worker = env
    job = _enqueue(config, store, "flux2", 0)
    StandIn.fail_with = LoraError("no key of the LoRA matches the model")
    worker.run_once(threading.Event())
    job = store.get(job.id)
    assert job.state == JobState.FAILED and "no key of the LoRA matches" in job.last_error
    # Beside the request that names the LoRA: the file to fix.
    assert "rendering with it failed: no key of the LoRA matches" in (config.inbox / "r.yaml.error.txt").read_text()


def test_out_of_memory_unloads_and_retries_later(env):
    config, store, renderer, worker = env
    job = _enqueue(config, store, "flux2", 0)
    StandIn.fail_with = PipelineOutOfMemory("flux2: out of memory on cuda")
    worker.run_once(threading.Event())
    job = store.get(job.id)
    assert job.state == JobState.QUEUED and job.run_after is not None
    assert "PipelineOutOfMemory" in job.last_error
    assert StandIn.instances[0].unloaded and renderer.model is None


def test_out_of_memory_of_a_direct_render_also_unloads(env):
    config, _store, renderer, _worker = env
    StandIn.fail_with = PipelineOutOfMemory("flux2: out of memory on cuda")
    task = RenderTask(spec=RenderSpec(model="flux2", prompt="x"),
                      target=OutputTarget(out_dir=str(config.outbox_root), image_name="x.png", title="t",
                                          source="s", prompt_index=0))
    with pytest.raises(PipelineOutOfMemory, match="out of memory on cuda"):
        renderer.render(task)
    assert StandIn.instances[0].unloaded and renderer.model is None


def test_shutdown_returns_the_running_job_to_the_queue(env):
    config, store, _renderer, worker = env
    job = _enqueue(config, store, "flux2", 0)
    stop = threading.Event()
    StandIn.fail_with = RenderInterrupted("stopped after step 1/25")
    worker.run_once(stop)
    job = store.get(job.id)
    assert job.state == JobState.QUEUED and job.attempts == 0


def test_a_job_cancelled_while_it_renders_is_stopped_through_the_lease(tmp_path, monkeypatch):
    StandIn.instances = []
    (tmp_path / "config.yaml").write_text(render_config().replace("heartbeat_seconds: 10", "heartbeat_seconds: 0.01"))
    config = load_config(tmp_path / "config.yaml")
    config.state_dir.mkdir()
    with JobStore(config.db_url) as store:
        store.create_schema()
        job = _enqueue(config, store, "flux2", 0)
        worker = Worker(store, Renderer(config, factory=StandIn), config, "w1")
        seen = []

        def render(spec, *, on_step=None, should_stop=None):
            # What the service's tick thread does while a render runs.
            store.cancel([job.id])
            time.sleep(0.02)
            worker.beat()
            seen.append(should_stop())
            raise RenderInterrupted("stopped after step 1/3")

        monkeypatch.setattr(StandIn, "render", staticmethod(render))
        assert worker.run_once(threading.Event())
        assert seen == [True] and store.get(job.id).state == JobState.CANCELLED


def test_a_run_on_its_own_base_loads_that_base_with_its_own_text_encoder(env):
    config, _store, renderer, _worker = env

    def task(base):
        return RenderTask(spec=RenderSpec(model="qwen_image_2512", prompt="x", width=64, height=64, base=base),
                          target=OutputTarget(out_dir=str(config.outbox_root), image_name="x.png", title="t",
                                              source="s", prompt_index=0))

    renderer.render(task(None))
    renderer.render(task("/srv/models/my-finetune"))
    renderer.render(task("/srv/models/my-finetune"))
    configured = config.model_source("qwen_image_2512")
    assert [s.source.path for s in StandIn.instances] == [configured.path, "/srv/models/my-finetune"]
    own = StandIn.instances[1].source
    assert own.quantize_text_encoder == configured.quantize_text_encoder and own.text_encoder is None
    assert StandIn.instances[0].unloaded and StandIn.instances[1].loads == 1


def test_one_quantised_base_per_model_and_quantisation_and_a_runs_checkpoints_reuse_it(env):
    from previewd.pipelines.quantization import Quantization
    from previewd.spec import AitkOptions

    config, _store, renderer, _worker = env

    def task(index, **aitk):
        return RenderTask(spec=RenderSpec(model="qwen_image_2512", prompt=f"p{index}", width=64, height=64,
                                          aitk=AitkOptions(**aitk)),
                          target=OutputTarget(out_dir=str(config.outbox_root), image_name=f"{index}.png", title="t",
                                              source="s", prompt_index=index))

    uint3 = {"quantize": True, "qtype": "uint3", "quantize_te": False}
    for index, options in enumerate([uint3, uint3, {}, {**uint3, "quantize_te": True}]):
        renderer.render(task(index, **options))
    assert [s.quantization for s in StandIn.instances] == [
        Quantization(transformer="uint3"), Quantization(), Quantization(transformer="uint3", text_encoder="qfloat8")]
    assert [s.loads for s in StandIn.instances] == [1, 1, 1]
