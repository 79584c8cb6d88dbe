"""The flux2 adapter end to end on the tiny model: determinism, LoRA, record, stop, references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_helpers import flux2_loras, pixels, spec, tiny_pipe  # noqa: F401  (fixtures)
from previewd.errors import RenderInterrupted
from previewd.pipelines import create
from previewd.spec import ControlImage, LoraSpec, ModelSource

pytestmark = pytest.mark.slow


def lora(folder, name="lora_a", multiplier=1.0):
    return LoraSpec(path=str(folder / f"{name}.safetensors"), network_multiplier=multiplier)


def test_deterministic_and_seed_sensitive(tiny_pipe):
    first, second = tiny_pipe.render(spec()), tiny_pipe.render(spec())
    assert np.array_equal(pixels(first), pixels(second))
    assert first.seed == 42 and first.image.size == (64, 64)
    assert np.abs(pixels(first) - pixels(tiny_pipe.render(spec(seed=7)))).max() > 20


def test_lora_changes_pixels_and_multiplier_zero_is_base(tiny_pipe, flux2_loras):
    base = pixels(tiny_pipe.render(spec()))
    with_lora = tiny_pipe.render(spec(lora=lora(flux2_loras)))
    assert np.abs(pixels(with_lora) - base).max() > 20
    assert with_lora.record["network_multiplier"] == 1.0
    assert np.array_equal(pixels(tiny_pipe.render(spec(lora=lora(flux2_loras, multiplier=0.0)))), base)
    other = pixels(tiny_pipe.render(spec(lora=lora(flux2_loras, "lora_b"))))
    assert np.abs(other - pixels(with_lora)).max() > 20
    assert np.array_equal(pixels(tiny_pipe.render(spec())), base)


def test_prompt_embeddings_equal_diffusers(tiny_pipe):
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    prompt = "a [IMG] red fox"
    expected = Flux2Pipeline._get_mistral_3_small_prompt_embeds(tiny_pipe.text_encoder, tiny_pipe.processor, prompt,
                                                                dtype=tiny_pipe.dtype, device=tiny_pipe.device)
    assert torch.equal(tiny_pipe.encode_prompt(prompt), expected)


def test_record_size_seed_and_unused_negative(tiny_pipe):
    result = tiny_pipe.render(spec(width=120, height=72, seed=-1, neg="blurry"))
    # ai-toolkit floors FLUX.2 sizes to 16 (flux2_model.py:88): 120 -> 112, not 96.
    assert (result.width, result.height) == (112, 64) and result.image.size == (112, 64)
    assert result.record["requested_size"] == [120, 72] and result.record["effective_size"] == [112, 64]
    assert "unused" in result.record["neg"]
    assert 0 <= result.seed < 2 ** 31
    again = tiny_pipe.render(spec(width=112, height=64, seed=result.seed, neg="anything else"))
    assert np.array_equal(pixels(again), pixels(result))


def test_progress_and_stop(tiny_pipe):
    steps = []
    tiny_pipe.render(spec(sample_steps=3), on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(RenderInterrupted):
        tiny_pipe.render(spec(sample_steps=3), should_stop=lambda: len(steps) >= 4,
                         on_step=lambda done, total: steps.append(done))
    assert len(steps) == 4


def test_reference_image_conditions_the_render(tiny_pipe, tmp_path):
    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype("uint8")
    path = tmp_path / "ref.png"
    Image.fromarray(gradient).save(path)
    base = pixels(tiny_pipe.render(spec()))
    result = tiny_pipe.render(spec(control_images=(ControlImage(slot="ctrl_img_1", path=str(path)),)))
    assert result.record["reference_images"] == 1
    assert np.abs(pixels(result) - base).max() > 0


def test_separate_text_encoder_source_and_qfloat8(tiny_model):
    model = str(tiny_model("flux2"))
    plain = create("flux2", ModelSource(path=model), device="cpu", dtype="float32")
    split = create("flux2", ModelSource(path=model, text_encoder=model), device="cpu", dtype="float32")
    assert np.array_equal(pixels(plain.render(spec())), pixels(split.render(spec())))
    quantized = create("flux2", ModelSource(path=model, quantize_text_encoder="qfloat8"), device="cpu",
                       dtype="float32")
    result = quantized.render(spec())
    assert result.record["quantization"]["text_encoder"] == "qfloat8"
    assert type(quantized.text_encoder.model.language_model.layers[0].mlp.up_proj).__name__ == "QLinear"
    for pipe in (plain, split, quantized):
        pipe.unload()


def test_sources_never_download(tmp_path):
    from previewd.errors import ModelNotFound
    from previewd.pipelines.model_sources import resolve_source

    assert resolve_source(str(tmp_path)) == tmp_path
    with pytest.raises(ModelNotFound, match="never downloads.*hf download previewd-tests/no-such-flux2-repo"):
        resolve_source("previewd-tests/no-such-flux2-repo")
