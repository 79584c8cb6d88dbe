"""ai-toolkit's FLUX.2 sampler as pure functions: schedule, noise, token ids, packing, Euler loop.

Every expression keeps the torch dtype and operation order of ai-toolkit's
`extensions_built_in/diffusion_models/flux2/src/{sampling,pipeline}.py`, because previews must match
its samples bit for bit where the hardware allows (../shared/reference/flux2-sampler.md §1.3-1.8).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from previewd.errors import RenderInterrupted

LATENT_CHANNELS = 128
"""Channels of the packed FLUX.2 latent (32 VAE channels x 2x2 patch)."""
VAE_SCALE = 16
"""Pixels per latent token side: 8x VAE downsampling times the 2x2 patch."""

# Linear mu between these (image_seq_len, mu) points, not clamped outside them.
_MU_POINTS = ((256, 0.5), (4096, 1.15))

Predict = Callable[[torch.Tensor, float], torch.Tensor]
"""predict(latents, t) -> velocity for the image tokens of `latents`."""


def schedule_mu(image_seq_len: int) -> float:
    """ai-toolkit's linear mu (diffusers' Flux2Pipeline uses `compute_empirical_mu` instead)."""
    # Follows diffusers pipelines/flux/pipeline_flux.py::calculate_shift (256, 4096, 0.5, 1.15)
    (x1, y1), (x2, y2) = _MU_POINTS
    slope = (y2 - y1) / (x2 - x1)
    return slope * image_seq_len + (y1 - slope * x1)


def aitk_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """The N+1 sigmas (1 ... 0) of ai-toolkit's `get_schedule`, as Python floats.

    Computed in torch float32 on purpose: `python / tensor` is a reciprocal-multiply there, which is
    what makes these bit-identical to ai-toolkit (numpy's true division differs by an ulp).
    """
    exp_mu = math.exp(schedule_mu(image_seq_len))
    t = torch.linspace(1, 0, num_steps + 1)
    return (exp_mu / (exp_mu + (1 / t - 1))).tolist()


def latent_grid(width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of latent tokens for an image already floored to the model's divisor."""
    return height // VAE_SCALE, width // VAE_SCALE


def draw_noise(seed: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 128, rows, cols) noise from a fresh CPU generator, drawn directly in `dtype`.

    Drawing bf16 directly is not the same as drawing float32 and casting; ai-toolkit draws in the
    model's dtype.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, LATENT_CHANNELS, rows, cols), generator=generator, dtype=dtype)


def image_ids(rows: int, cols: int, t: int = 0) -> torch.Tensor:
    """(rows*cols, 4) int64 (t, h, w, l) ids, h-major like the packed tokens."""
    # Follows diffusers pipelines/flux2/pipeline_flux2.py::Flux2Pipeline._prepare_latent_ids (no batch axis)
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(rows), torch.arange(cols), torch.tensor([0]))


def text_ids(length: int) -> torch.Tensor:
    """(length, 4) int64 (0, 0, 0, l) ids."""
    # Follows diffusers pipelines/flux2/pipeline_flux2.py::Flux2Pipeline._prepare_text_ids (no batch axis)
    zero = torch.tensor([0])
    return torch.cartesian_prod(zero, zero, zero, torch.arange(length))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C) tokens."""
    # Follows diffusers pipelines/flux2/pipeline_flux2.py::Flux2Pipeline._pack_latents
    batch, channels = latents.shape[:2]
    return latents.reshape(batch, channels, -1).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, h*w, C) tokens -> (B, C, h, w); the inverse of `pack` for ids from `image_ids`.

    What diffusers' `Flux2Pipeline._unpack_latents_with_ids` gives for those ids, as a reshape instead
    of its scatter.
    """
    batch, _, channels = tokens.shape
    return tokens.permute(0, 2, 1).reshape(batch, channels, rows, cols)


def denoise(predict: Predict, latents: torch.Tensor, sigmas: list[float], *,
            on_step: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Plain Euler over `sigmas`, in the latents' dtype (two roundings per step in bf16, as ai-toolkit).

    `should_stop` is asked before every model call, so a stop costs at most one step.
    """
    total = len(sigmas) - 1
    for step, (t_curr, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if should_stop is not None and should_stop():
            raise RenderInterrupted(f"stopped after {step} of {total} steps")
        latents = latents + (t_next - t_curr) * predict(latents, t_curr)
        if on_step is not None:
            on_step(step + 1, total)
    return latents
