"""Qwen-Image latents to pixels, the same for every Qwen pipeline (diffusers decodes them alike)."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Packed latents of a `height` x `width` image -> float images (B, H, W, 3) in [0, 1] (NaN stays NaN)."""
    # Follows diffusers pipelines/qwenimage/pipeline_qwenimage.py::QwenImagePipeline.__call__ (its decode)
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
    z_dim = pipe.vae.config.z_dim
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
        latents.device, latents.dtype)
    latents = latents / inv_std + mean
    image = pipe.vae.decode(latents, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="np")
