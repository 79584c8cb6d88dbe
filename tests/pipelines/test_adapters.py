"""What every adapter promises whatever its model: render reads as numbered stages, and running out
of device memory surfaces as PipelineOutOfMemory. No model is loaded."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from previewd import pipelines
from previewd.errors import PipelineOutOfMemory
from previewd.pipelines.qwen.edit_plus_loop import QwenEditPlusCfgNormPipeline
from previewd.spec import MODEL_IDS, ModelSource, RenderSpec

STAGE = re.compile(r"^\s*# (\d+)\. ")
ADAPTERS = sorted({pipelines.adapter_class(model_id) for model_id in MODEL_IDS}, key=lambda cls: cls.__name__)
NUMBERED = [cls.render for cls in ADAPTERS] + [QwenEditPlusCfgNormPipeline.sample]


@pytest.mark.parametrize("function", NUMBERED, ids=lambda f: f.__qualname__)
def test_stages_are_numbered_from_one_without_gaps(function):
    numbers = [int(m[1]) for line in inspect.getsource(function).splitlines() if (m := STAGE.match(line))]
    assert len(numbers) >= 4, f"{function.__qualname__} has no numbered stages"
    assert numbers == list(range(1, len(numbers) + 1)), f"{function.__qualname__}: stages {numbers}"


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _adapter(model_id: str):
    return pipelines.create(model_id, ModelSource(path="never-loaded"), device="cpu", dtype="float32")


def _assert_converted(info: pytest.ExceptionInfo, model_id: str) -> None:
    assert str(info.value).startswith(f"{model_id}: out of memory on cpu: CUDA out of memory")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # The original error's frames (and the tensors they hold) must not outlive the render.
    assert info.value.__context__ is None or info.value.__context__.__traceback__ is None


@pytest.mark.parametrize("model_id", ["qwen_image_2512", "flux2"])
def test_out_of_memory_inside_render_is_pipeline_out_of_memory(monkeypatch, model_id):
    adapter = _adapter(model_id)
    monkeypatch.setattr(adapter, "load", _oom)
    with pytest.raises(PipelineOutOfMemory) as info:
        adapter.render(RenderSpec(model=model_id, prompt="a fox", width=64, height=64))
    _assert_converted(info, model_id)


def test_out_of_memory_while_loading_qwen_is_pipeline_out_of_memory(monkeypatch):
    adapter = _adapter("qwen_image_2512")

    class Pipeline:
        from_pretrained = staticmethod(_oom)

    monkeypatch.setattr(adapter, "_pipeline_class", lambda: Pipeline)
    with pytest.raises(PipelineOutOfMemory) as info:
        adapter.load()
    _assert_converted(info, "qwen_image_2512")


def test_out_of_memory_while_loading_flux2_is_pipeline_out_of_memory(monkeypatch, tmp_path):
    from diffusers import Flux2Transformer2DModel

    adapter = pipelines.create("flux2", ModelSource(path=str(tmp_path)), device="cpu", dtype="float32")
    monkeypatch.setattr(Flux2Transformer2DModel, "from_pretrained", _oom)
    with pytest.raises(PipelineOutOfMemory) as info:
        adapter.load()
    _assert_converted(info, "flux2")
