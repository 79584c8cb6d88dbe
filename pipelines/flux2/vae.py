"""FLUX.2 VAE glue around diffusers' AutoencoderKLFlux2: latent (de)normalisation, 2x2 (un)patchify,
the reference-image preparation of ai-toolkit's `encode_image_refs`, and 8-bit post-processing."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from previewd.errors import ControlImageError

PATCH = 2
REF_MAX_PIXELS = 1024 ** 2
REF_MIN_SIDE = 64
REF_MAX_ASPECT = 8
REF_MULTIPLE = 16
REF_T_STEP = 10
"""Reference image k (0-based) gets time coordinate 10 * (k + 1)."""


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C*4, h, w) -> (B, C, 2h, 2w); channel order (c, pi, pj)."""
    # Follows diffusers pipelines/flux2/pipeline_flux2.py::Flux2Pipeline._unpatchify_latents
    batch, channels, rows, cols = z.shape
    z = z.reshape(batch, channels // (PATCH * PATCH), PATCH, PATCH, rows, cols)
    return z.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels // (PATCH * PATCH), rows * PATCH, cols * PATCH)


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, C*4, h, w); the inverse of `unpatchify`."""
    # Follows diffusers pipelines/flux2/pipeline_flux2.py::Flux2Pipeline._patchify_latents (reshape for view)
    batch, channels, height, width = z.shape
    z = z.reshape(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    return z.permute(0, 1, 3, 5, 2, 4).reshape(batch, channels * PATCH * PATCH, height // PATCH, width // PATCH)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Packed-channel latents (B, 128, h, w) -> float32 (H, W, 3) in [0, 1] of the first image.

    The batch-norm un-normalisation runs in the VAE's dtype, the decoder output is upcast to float32
    before post-processing (ai-toolkit's `.float()`), as in ai-toolkit's BFL AutoEncoder.
    """
    # Follows diffusers pipelines/flux2/pipeline_flux2.py::Flux2Pipeline.__call__ (its decode), in those dtypes
    bn = vae.bn
    z = latents.to(vae.dtype)
    z = z * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) + bn.running_mean.view(1, -1, 1, 1)
    image = vae.decode(unpatchify(z)).sample.float()
    image = (image / 2 + 0.5).clamp(0, 1)
    return image[0].permute(1, 2, 0).cpu().numpy()


def to_pil(array: np.ndarray) -> Image.Image:
    """float32 (H, W, 3) in [0, 1] -> RGB image, rounded like diffusers' numpy_to_pil."""
    return Image.fromarray((array * 255).round().astype("uint8"))


def prepare_reference(image: Image.Image, *, max_pixels: int = REF_MAX_PIXELS) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1]: capped to `max_pixels` (LANCZOS), centre-cropped
    to a multiple of 16, as ai-toolkit's `default_prep`."""
    image = image.convert("RGB")
    width, height = image.size
    if min(width, height) < REF_MIN_SIDE:
        raise ControlImageError(f"control image is {width}x{height}; FLUX.2 needs at least "
                                f"{REF_MIN_SIDE} px per side")
    if max(width / height, height / width) > REF_MAX_ASPECT:
        raise ControlImageError(f"control image is {width}x{height}; FLUX.2 accepts an aspect ratio "
                                f"of at most {REF_MAX_ASPECT}:1")
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    crop_w, crop_h = width // REF_MULTIPLE * REF_MULTIPLE, height // REF_MULTIPLE * REF_MULTIPLE
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return (2 * pixels - 1).unsqueeze(0)


@torch.no_grad()
def encode_references(vae, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference images -> (1, N, 128) tokens in bfloat16 and their (N, 4) int64 ids.

    ai-toolkit returns the tokens as bfloat16 whatever the model dtype; the sampler then concatenates
    them with the latents, which promotes them back, so the bf16 rounding is part of the result.
    The ids are those of diffusers' `Flux2Pipeline._prepare_image_ids` (t = 10, 20, ...).
    """
    tokens, ids = [], []
    for index, image in enumerate(images):
        pixels = prepare_reference(image).to(device=vae.device, dtype=vae.dtype)
        mean = vae.encode(pixels).latent_dist.mode()
        z = vae.bn(patchify(mean))[0]
        channels, rows, cols = z.shape
        tokens.append(z.reshape(channels, -1).permute(1, 0))
        ids.append(torch.cartesian_prod(torch.tensor([REF_T_STEP * (index + 1)]), torch.arange(rows),
                                        torch.arange(cols), torch.tensor([0])))
    return torch.cat(tokens).unsqueeze(0).to(torch.bfloat16), torch.cat(ids)
