"""The FLUX.2 sampler's pure parts against ai-toolkit's values; no model needed."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from flux2_helpers import GOLDENS
from previewd.errors import ControlImageError, RenderInterrupted
from previewd.pipelines.flux2 import sampler
from previewd.pipelines.flux2 import text as flux2_text
from previewd.pipelines.flux2 import vae as flux2_vae

SCHEDULES = GOLDENS / "schedules.json"


def aitk_schedules():
    if not SCHEDULES.is_file():
        return []
    return sorted(json.loads(SCHEDULES.read_text())["flux2_aitk"].items())


def test_the_recorded_schedules_are_there():
    assert len(aitk_schedules()) >= 30, f"expected ai-toolkit's schedules in {SCHEDULES}"


@pytest.mark.parametrize(("key", "expected"), aitk_schedules(), ids=lambda v: v if isinstance(v, str) else "")
def test_schedule_equals_ai_toolkit_exactly(key, expected):
    size, steps = key.split("/")
    width, height = map(int, size.split("x"))
    rows, cols = sampler.latent_grid(width, height)
    assert rows * cols == expected["image_seq_len"]
    assert sampler.schedule_mu(rows * cols) == expected["mu"]
    assert sampler.aitk_schedule(int(steps.removeprefix("steps")), rows * cols) == expected["timesteps"]


def test_schedule_shape():
    sigmas = sampler.aitk_schedule(25, 4096)
    assert len(sigmas) == 26 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert sampler.schedule_mu(4096) == pytest.approx(1.15)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


def test_noise_is_drawn_in_the_model_dtype():
    direct = sampler.draw_noise(42, 4, 6, torch.bfloat16)
    assert direct.shape == (1, 128, 4, 6) and direct.dtype == torch.bfloat16
    assert torch.equal(direct, sampler.draw_noise(42, 4, 6, torch.bfloat16))


def test_pack_and_ids_agree():
    latents = torch.randn(1, 128, 3, 5)
    tokens = sampler.pack(latents)
    ids = sampler.image_ids(3, 5)
    assert tokens.shape == (1, 15, 128) and ids.shape == (15, 4) and ids.dtype == torch.int64
    row, col = ids[7, 1].item(), ids[7, 2].item()
    assert torch.equal(tokens[0, 7], latents[0, :, row, col])
    assert torch.equal(sampler.unpack(tokens, 3, 5), latents)
    assert sampler.text_ids(4)[:, 3].tolist() == [0, 1, 2, 3] and sampler.text_ids(4)[:, :3].abs().sum() == 0


def test_patchify_round_trip_and_channel_order():
    z = torch.randn(1, 8, 6, 4)
    assert torch.equal(flux2_vae.patchify(flux2_vae.unpatchify(z)), z)
    # channel c*4 + pi*2 + pj lands at pixel (2i + pi, 2j + pj) of channel c
    assert flux2_vae.unpatchify(z)[0, 1, 2 * 2 + 1, 2 * 3 + 0] == z[0, 1 * 4 + 1 * 2 + 0, 2, 3]


def test_helpers_equal_the_diffusers_functions_they_follow():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, format_input

    latents = torch.randn(1, 128, 3, 5)
    tokens, ids = sampler.pack(latents), sampler.image_ids(3, 5)
    assert torch.equal(tokens, Flux2Pipeline._pack_latents(latents))
    assert torch.equal(ids, Flux2Pipeline._prepare_latent_ids(latents)[0])
    assert torch.equal(sampler.unpack(tokens, 3, 5), Flux2Pipeline._unpack_latents_with_ids(tokens, ids[None]))
    assert torch.equal(sampler.text_ids(7), Flux2Pipeline._prepare_text_ids(torch.zeros(1, 7, 2))[0])
    z = torch.randn(1, 8, 6, 4)
    assert torch.equal(flux2_vae.patchify(z), Flux2Pipeline._patchify_latents(z))
    assert torch.equal(flux2_vae.unpatchify(z), Flux2Pipeline._unpatchify_latents(z))
    assert all(sampler.schedule_mu(n) == calculate_shift(n, 256, 4096, 0.5, 1.15) for n in (1, 256, 1234, 4096, 9000))
    assert flux2_text.chat_messages("a [IMG] cat") == format_input(["a [IMG] cat"], flux2_text.SYSTEM_MESSAGE)[0]


def test_denoise_is_euler_with_progress_and_stop():
    calls = []
    out = sampler.denoise(lambda x, t: torch.full_like(x, t), torch.zeros(1, 2, 3), [1.0, 0.5, 0.0],
                          on_step=lambda done, total: calls.append((done, total)))
    assert torch.allclose(out, torch.full((1, 2, 3), -(0.5 * 1.0 + 0.5 * 0.5)))
    assert calls == [(1, 2), (2, 2)]
    with pytest.raises(RenderInterrupted):
        sampler.denoise(lambda x, t: x, torch.zeros(1), [1.0, 0.5, 0.0], should_stop=lambda: True)


def test_system_message_is_diffusers_and_ai_toolkit_text():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    assert flux2_text.SYSTEM_MESSAGE == SYSTEM_MESSAGE
    messages = flux2_text.chat_messages("a [IMG] cat")
    assert messages[1]["content"][0]["text"] == "a  cat"


def test_reference_preparation_caps_crops_and_refuses():
    big = Image.new("RGB", (1500, 1000), (255, 0, 0))
    prepared = flux2_vae.prepare_reference(big)
    height, width = prepared.shape[-2:]
    assert height * width <= 1024 ** 2 and height % 16 == 0 and width % 16 == 0
    assert prepared[0, 0].min() == 1.0 and prepared[0, 1].max() == -1.0
    assert flux2_vae.prepare_reference(Image.new("RGB", (100, 72))).shape == (1, 3, 64, 96)
    with pytest.raises(ControlImageError):
        flux2_vae.prepare_reference(Image.new("RGB", (63, 200)))
    with pytest.raises(ControlImageError):
        flux2_vae.prepare_reference(Image.new("RGB", (64, 1000)))
