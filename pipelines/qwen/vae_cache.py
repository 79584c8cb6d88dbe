"""Reuse the VAE latents of control images across renders.

The edit pipelines VAE-encode every control image at ~1 MP on every call; with the posterior's
argmax (no sampling) that is a pure function of the preprocessed pixels and the VAE, which a LoRA
never touches. Successive checkpoints of one job preview the same control images, so the latents
are cached by pixel content. The result is bitwise the one a fresh encode gives.
"""

from __future__ import annotations

import hashlib

import torch
from diffusers import QwenImageEditPipeline

from previewd.pipelines.lru import LruCache

CACHE_SIZE = 8


class CachedVaeEncodeMixin:
    """Overrides the Qwen edit pipelines' `_encode_vae_image` with a content-keyed LRU cache."""

    def _latent_cache(self) -> LruCache[tuple, torch.Tensor]:
        # from_pretrained builds the pipeline without calling a constructor of ours.
        cache = getattr(self, "_previewd_latent_cache", None)
        if cache is None:
            cache = LruCache(CACHE_SIZE)
            self._previewd_latent_cache = cache
        return cache

    def _encode_vae_image(self, image: torch.Tensor, generator: torch.Generator):
        raw = image.detach().to("cpu").contiguous().view(torch.uint8)  # any dtype, bf16 included
        digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
        key = (digest, tuple(image.shape), str(image.dtype), str(image.device), bool(self.vae.use_tiling))
        encode = super()._encode_vae_image
        return self._latent_cache().get_or_compute(key, lambda: encode(image=image, generator=generator))

    def clear_latent_cache(self) -> None:
        self._latent_cache().clear()


class QwenEditCachedPipeline(CachedVaeEncodeMixin, QwenImageEditPipeline):
    """diffusers' QwenImageEditPipeline with cached control-image latents."""
