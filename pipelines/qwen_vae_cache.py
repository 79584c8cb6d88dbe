"""Reuse the VAE latents of control images across renders.

The edit pipelines VAE-encode every control image at ~1 MP on every call; with the posterior's
argmax (no sampling) that is a pure function of the preprocessed pixels and the VAE, which a LoRA
never touches. Successive checkpoints of one job preview the same control images, so the latents
are cached by pixel content. The result is bitwise the one a fresh encode gives.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from diffusers import QwenImageEditPipeline

CACHE_SIZE = 8


class CachedVaeEncodeMixin:
    """Overrides the Qwen edit pipelines' `_encode_vae_image` with a content-keyed LRU cache."""

    def _latent_cache(self) -> OrderedDict:
        cache = getattr(self, "_previewd_latent_cache", None)
        if cache is None:
            cache = OrderedDict()
            self._previewd_latent_cache = cache
        return cache

    def _encode_vae_image(self, image: torch.Tensor, generator: torch.Generator):
        raw = image.detach().to("cpu").contiguous().view(torch.uint8)  # any dtype, bf16 included
        digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
        key = (digest, tuple(image.shape), str(image.dtype), str(image.device), bool(self.vae.use_tiling))
        cache = self._latent_cache()
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        latents = super()._encode_vae_image(image=image, generator=generator)
        cache[key] = latents
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        return latents

    def clear_latent_cache(self) -> None:
        self._latent_cache().clear()


class QwenEditCachedPipeline(CachedVaeEncodeMixin, QwenImageEditPipeline):
    """diffusers' QwenImageEditPipeline with cached control-image latents."""
