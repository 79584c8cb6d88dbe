"""Placements change where weights live, never the pixels: renders with the text encoder offloaded
(its weights dropped to the meta device after encoding, so nothing after encoding can read them),
with model offload and with group offload are bitwise equal to renders with everything resident.
On the CPU the device and host memory are the same memory, so this checks the mechanics (hooks,
LoRA switches under hooks, the embedding cache), not the transfers."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest
import torch

from previewd.errors import PipelineOutOfMemory
from previewd.pipelines import create
from previewd.pipelines import device as devices
from previewd.pipelines.memory import GiB, MemorySettings, choose, measure
from previewd.spec import LoraSpec, ModelSource, RenderSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model):
    from previewd.pipelines.tiny.flux2 import write_bfl_lora
    from previewd.pipelines.tiny.qwen import write_random_lora

    folder = tmp_path_factory.mktemp("placement_loras")
    paths = {"flux2": [], "qwen_image_2512": []}
    for seed in (1, 2):
        paths["flux2"].append(write_bfl_lora(folder / f"flux2_{seed}.safetensors", seed=seed))
        qwen = folder / f"qwen_{seed}.safetensors"
        write_random_lora(tiny_model("qwen_image_2512"), qwen, seed=seed)
        paths["qwen_image_2512"].append(qwen)
    return paths


def _specs(model_id: str, loras) -> list[RenderSpec]:
    # One prompt over two checkpoints: the second render takes its embeddings from the cache.
    return [RenderSpec(model=model_id, prompt="a red fox in fresh snow", width=64, height=64, seed=3,
                       sample_steps=3, lora=LoraSpec(path=str(path), sha256=f"sha{i}"))
            for i, path in enumerate(loras[model_id])]


def _adapter(model_id: str, folder, placement: str | None):
    adapter = create(model_id, ModelSource(path=str(folder)), device="cpu", dtype="float32")
    if placement is not None:
        plan = choose(model_id, measure(model_id, adapter.source, "float32"), device="cuda", dtype="float32",
                      settings=MemorySettings(budget_bytes=1000 * GiB, placement=placement))
        adapter.plan = dataclasses.replace(plan, device="cpu")
    return adapter


def _render_all(adapter, specs) -> list[np.ndarray]:
    images = [np.asarray(adapter.render(spec).image) for spec in specs]
    return images


@pytest.fixture(scope="module")
def resident(tiny_model, loras):
    images = {}
    for model_id in ("qwen_image_2512", "flux2"):
        adapter = _adapter(model_id, tiny_model(model_id), None)
        images[model_id] = _render_all(adapter, _specs(model_id, loras))
        adapter.unload()
    return images


def _text_encoder(adapter):
    return adapter._offloaded_text_encoder if hasattr(adapter, "_offloaded_text_encoder") else adapter.text_encoder


@pytest.mark.parametrize("model_id", ["qwen_image_2512", "flux2"])
def test_text_encoder_offloaded_renders_equal_resident_ones(tiny_model, loras, resident, model_id):
    adapter = _adapter(model_id, tiny_model(model_id), "te_offload")
    adapter.load()
    adapter._placer.offload_device = "meta"
    specs = _specs(model_id, loras)
    first = adapter.render(specs[0])
    # Encoded, then sent away: the weights are gone, so denoising and decoding never touched them.
    assert {p.device.type for p in _text_encoder(adapter).parameters()} == {"meta"}
    second = adapter.render(specs[1])
    assert first.record["placement"] == "te_offload"
    for image, expected in zip((first.image, second.image), resident[model_id]):
        assert np.array_equal(np.asarray(image), expected)
    if model_id != "flux2":
        assert adapter.pipe.text_encoder is None  # out of the pipeline: it never decides where it computes
    adapter.unload()


@pytest.mark.parametrize("model_id,placement", [("flux2", "model_offload"), ("flux2", "group_offload"),
                                                ("qwen_image_2512", "group_offload")])
def test_offloaded_renders_equal_resident_ones(tiny_model, loras, resident, model_id, placement):
    adapter = _adapter(model_id, tiny_model(model_id), placement)
    images = _render_all(adapter, _specs(model_id, loras))
    for image, expected in zip(images, resident[model_id]):
        assert np.array_equal(image, expected)
    adapter.unload()


def test_the_weights_are_unreachable_when_memory_is_freed_after_an_out_of_memory_error(tiny_model, tmp_path,
                                                                                     monkeypatch):
    """The OOM path really returns memory: when the renderer empties the device cache, nothing (no
    traceback frame, no exception context) holds the model any more."""
    from previewd.config import load_config
    from previewd.instance import render_config
    from previewd.tasks import OutputTarget, RenderTask
    from previewd.worker import Renderer

    (tmp_path / "config.yaml").write_text(render_config(tiny_models_dir=str(tiny_model("flux2").parent)))
    config = load_config(tmp_path / "config.yaml")
    renderer = Renderer(config)
    task = RenderTask(spec=RenderSpec(model="flux2", prompt="x", width=64, height=64, sample_steps=2),
                      target=OutputTarget(out_dir=str(tmp_path / "out"), image_name="x.png", title="t", source="s",
                                          prompt_index=0))
    renderer.render(task)
    adapter = renderer._pipeline
    transformer = weakref.ref(adapter.transformer)

    def denoise(*args, **kwargs):
        hidden = torch.zeros(1 << 16)  # noqa: F841 - a failed step's activations, held by this frame
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    seen = []
    free_memory = devices.free_memory

    def observe(device):
        free_memory(device)
        seen.append(transformer() is None)

    monkeypatch.setattr(adapter, "denoise", denoise)
    monkeypatch.setattr(devices, "free_memory", observe)
    del adapter
    with pytest.raises(PipelineOutOfMemory):
        renderer.render(task.model_copy(update={"spec": task.spec.model_copy(update={"prompt": "y"})}))
    assert seen == [True]
    gc.collect()
    assert transformer() is None


def test_group_offload_streams_plain_weights_and_moves_quanto_ones_whole():
    from optimum.quanto import freeze, qfloat8, quantize

    from previewd.pipelines.placement import Placer

    plain, quantised = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    quantize(quantised, weights=qfloat8)
    freeze(quantised)
    on_gpu = Placer(None, "cuda:0")  # constructing one touches no device
    assert on_gpu._streams(plain) and not on_gpu._streams(quantised)
    assert not Placer(None, "cpu")._streams(plain)
