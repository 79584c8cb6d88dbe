"""Fused LoRAs (2512, 2511) switch without drift: the base weights come back bit for bit.

In bfloat16, unfuse alone leaves a rounding residue that grows with each checkpoint switch;
previewd reads the touched weights back from the model files after unfusing.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from previewd.pipelines.qwen.adapter import QwenImagePreview
from previewd.spec import LoraSpec, ModelSource, RenderSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tiny_model, tmp_path_factory) -> tuple[Path, list[LoraSpec]]:
    from previewd.pipelines.tiny.qwen import write_random_lora

    folder = tiny_model("qwen_image_2512")
    loras_dir = tmp_path_factory.mktemp("loras")
    loras = [LoraSpec(path=str(write_random_lora(folder, loras_dir / f"l{seed}.safetensors", seed=seed)),
                      sha256=f"l{seed}") for seed in (1, 2)]
    return folder, loras


def _base(pipeline: QwenImagePreview) -> dict[str, torch.Tensor]:
    return {name.replace(".base_layer", ""): p.detach().clone()
            for name, p in pipeline.pipe.transformer.named_parameters() if "lora_" not in name}


def _cycle(pipeline: QwenImagePreview, loras: list[LoraSpec]) -> None:
    for _ in range(5):
        for lora, multiplier in ((loras[0], 1.0), (loras[1], 1.0), (loras[1], 0.5)):
            pipeline.lora.apply(lora.model_copy(update={"network_multiplier": multiplier}))
    pipeline.lora.apply(None)


def _max_drift(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max((before[k].float() - after[k].float()).abs().max().item() for k in before)


def test_bf16_switches_leave_the_base_weights_bit_identical(tiny):
    folder, loras = tiny
    pipeline = QwenImagePreview("qwen_image_2512", ModelSource(path=str(folder)), device="cpu", dtype="bfloat16")
    pipeline.load()
    before = _base(pipeline)
    _cycle(pipeline, loras)
    assert _max_drift(before, _base(pipeline)) == 0.0

    spec = RenderSpec(model="qwen_image_2512", prompt="a fox", width=64, height=64, sample_steps=2,
                      lora=loras[1])
    fresh = QwenImagePreview("qwen_image_2512", ModelSource(path=str(folder)), device="cpu", dtype="bfloat16")
    assert np.array_equal(np.asarray(pipeline.render(spec).image), np.asarray(fresh.render(spec).image))


def test_without_the_restore_bf16_unfusing_drifts(tiny):
    """What the restore is for (and proof that the test above can fail)."""
    folder, loras = tiny
    pipeline = QwenImagePreview("qwen_image_2512", ModelSource(path=str(folder)), device="cpu", dtype="bfloat16")
    pipeline.load()
    pipeline.lora._base_weights = None
    before = _base(pipeline)
    _cycle(pipeline, loras)
    assert _max_drift(before, _base(pipeline)) > 0.0


def test_aitk_unmerged_runs_use_a_runtime_branch_and_modes_switch_cleanly(tiny):
    """A quantised ai-toolkit run sampled with the LoRA unmerged: aitk follows the run."""
    from previewd.spec import AitkOptions

    folder, loras = tiny
    pipeline = QwenImagePreview("qwen_image_2512", ModelSource(path=str(folder)), device="cpu", dtype="bfloat16")
    merged = RenderSpec(model="qwen_image_2512", prompt="a fox", width=64, height=64, sample_steps=2, lora=loras[0])
    unmerged = merged.model_copy(update={"aitk": AitkOptions(lora_merged=False)})
    first = pipeline.render(merged)
    branch = pipeline.render(unmerged)
    again = pipeline.render(merged)
    assert first.record["lora"]["mode"] == "fuse" and branch.record["lora"]["mode"] == "branch"
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    pipeline.lora.apply(None)
    fresh = QwenImagePreview("qwen_image_2512", ModelSource(path=str(folder)), device="cpu", dtype="bfloat16")
    fresh.load()
    assert _max_drift(_base(fresh), _base(pipeline)) == 0.0


def test_unfusing_restores_from_the_files_without_subtracting_and_peft_knows(tiny, monkeypatch):
    """The restore overwrites the merged weights, so nothing is subtracted first; peft and diffusers
    still learn that nothing is merged, so the next fuse starts from the base as a fresh one does."""
    folder, loras = tiny
    pipeline = QwenImagePreview("qwen_image_2512", ModelSource(path=str(folder)), device="cpu", dtype="bfloat16")
    pipeline.load()
    before = _base(pipeline)
    pipeline.lora.apply(loras[0], "fuse")
    monkeypatch.setattr(pipeline.pipe, "unfuse_lora", lambda *a, **k: pytest.fail("unfuse_lora was called"))
    pipeline.lora.apply(loras[0], "adapter")
    assert _max_drift(before, _base(pipeline)) == 0.0
    assert pipeline.pipe.num_fused_loras == 0
    assert not any(getattr(m, "merged", False) for m in pipeline.pipe.transformer.modules())
    spec = RenderSpec(model="qwen_image_2512", parity="reference", prompt="a fox", width=64, height=64,
                      sample_steps=2, lora=loras[1])  # reference 2512 fuses
    fresh = QwenImagePreview("qwen_image_2512", ModelSource(path=str(folder)), device="cpu", dtype="bfloat16")
    assert np.array_equal(np.asarray(pipeline.render(spec).image), np.asarray(fresh.render(spec).image))


def test_a_checkpoint_of_lower_rank_swaps_into_the_prepared_adapter(tiny, tmp_path):
    """enable_lora_hotswap pads to the first checkpoint's rank: a lower-rank one swaps in place and renders
    as a fresh load of it does."""
    from previewd.pipelines.tiny.qwen import write_random_lora

    folder, loras = tiny
    pipeline = QwenImagePreview("qwen_image_2512", ModelSource(path=str(folder)), device="cpu", dtype="float32")
    pipeline.load()
    pipeline.lora.apply(loras[0], "adapter")
    low = LoraSpec(path=str(write_random_lora(folder, tmp_path / "low.safetensors", seed=3, rank=2)), sha256="low")
    record = pipeline.lora.apply(low, "adapter")
    assert record["swap"] == "hotswap" and record["ranks"] == [2]
    spec = RenderSpec(model="qwen_image_2512", parity="reference", prompt="a fox", width=64, height=64,
                      sample_steps=2, lora=low)
    fresh = QwenImagePreview("qwen_image_2512", ModelSource(path=str(folder)), device="cpu", dtype="float32")
    assert np.array_equal(np.asarray(pipeline.render(spec).image), np.asarray(fresh.render(spec).image))
