"""Qwen-Image-Edit-Plus sampling with switchable CFG renormalisation (ai-toolkit's sampler).

diffusers' `QwenImageEditPlusPipeline` always rescales the CFG prediction to the norm of the
conditional one. ai-toolkit samples edit-plus with its own pipeline, where that rescale happens
only with `sample.do_cfg_norm` (off by default), which moves pixels by tens of levels
(aitk-sampling.md §C.2, goldens COMPARISON D4). Everything else must stay numerically what the
diffusers pipeline does, so this subclass reuses the parent's helpers and changes only the loop.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as stock
from PIL import Image

from previewd.pipelines.qwen.vae_cache import CachedVaeEncodeMixin


class QwenEditPlusCfgNormPipeline(CachedVaeEncodeMixin, QwenImageEditPlusPipeline):
    """Edit-plus pipeline whose `sample` takes pre-encoded prompts and a `cfg_norm` switch.

    Control-image latents are cached across calls (vae_cache).
    """

    def _vae_condition(self, images: list[Image.Image]):
        """Each control image at ~1 MP (aspect kept, 32-rounded), as the parent prepares it."""
        tensors, sizes = [], []
        for img in images:
            width, height = stock.calculate_dimensions(stock.VAE_IMAGE_SIZE, img.width / img.height)
            sizes.append((width, height))
            tensors.append(self.image_processor.preprocess(img, height, width).unsqueeze(2))
        return tensors, sizes

    def _predict(self, latents, image_latents, t, embeds, mask, img_shapes, branch: str):
        model_input = torch.cat([latents, image_latents], dim=1)
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        with self.transformer.cache_context(branch):
            out = self.transformer(hidden_states=model_input, timestep=timestep / 1000, guidance=None,
                                   encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                                   img_shapes=img_shapes, attention_kwargs={}, return_dict=False)[0]
        return out[:, : latents.size(1)]

    @torch.no_grad()
    def sample(self, images: list[Image.Image], *, prompt_embeds: torch.Tensor,
               prompt_embeds_mask: torch.Tensor | None, negative_prompt_embeds: torch.Tensor,
               negative_prompt_embeds_mask: torch.Tensor | None, height: int, width: int,
               num_inference_steps: int, true_cfg_scale: float, generator: torch.Generator,
               cfg_norm: bool, callback_on_step_end: Callable | None = None) -> torch.Tensor:
        """Denoise; returns the packed latents, as the parent does with `output_type="latent"`."""
        # Follows diffusers pipelines/qwenimage/pipeline_qwenimage_edit_plus.py::QwenImageEditPlusPipeline.__call__
        multiple = self.vae_scale_factor * 2
        height, width = height // multiple * multiple, width // multiple * multiple
        device = self._execution_device

        # 1. Embeddings: an all-ones mask means "no mask", as the parent's encode_prompt decides.
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=None, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask, device=device)
        do_cfg = true_cfg_scale > 1
        if do_cfg:
            negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt(
                prompt=None, prompt_embeds=negative_prompt_embeds,
                prompt_embeds_mask=negative_prompt_embeds_mask, device=device)

        # 2. Noise and control latents.
        vae_images, vae_sizes = self._vae_condition(images)
        channels = self.transformer.config.in_channels // 4
        latents, image_latents = self.prepare_latents(vae_images, 1, channels, height, width,
                                                      prompt_embeds.dtype, device, generator)
        scale = self.vae_scale_factor * 2
        img_shapes = [[(1, height // scale, width // scale),
                       *[(1, h // scale, w // scale) for w, h in vae_sizes]]]

        # 3. Timesteps, exactly as the parent derives them.
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        config = self.scheduler.config
        mu = stock.calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                                   config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                   config.get("max_shift", 1.15))
        timesteps, _ = stock.retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                sigmas=sigmas, mu=mu)
        self._num_timesteps = len(timesteps)

        # 4. Denoising loop.
        self.scheduler.set_begin_index(0)
        for i, t in enumerate(timesteps):
            self._current_timestep = t
            noise_pred = self._predict(latents, image_latents, t, prompt_embeds, prompt_embeds_mask,
                                       img_shapes, "cond")
            if do_cfg:
                neg = self._predict(latents, image_latents, t, negative_prompt_embeds,
                                    negative_prompt_embeds_mask, img_shapes, "uncond")
                combined = neg + true_cfg_scale * (noise_pred - neg)
                if cfg_norm:
                    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
                    combined = combined * (cond_norm / torch.norm(combined, dim=-1, keepdim=True))
                noise_pred = combined
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, {"latents": latents})
                latents = out.pop("latents", latents)
        self._current_timestep = None
        self.maybe_free_model_hooks()
        return latents
