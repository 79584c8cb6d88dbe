"""FLUX.2-dev rendered the way ai-toolkit samples it, without an ai-toolkit checkout.

diffusers supplies the networks (Flux2Transformer2DModel, AutoencoderKLFlux2) and transformers the
Mistral-3 text encoder; the sampling itself is previewd's (flux2_sampler), because diffusers'
Flux2Pipeline uses another schedule, timestep rounding and Euler precision
(../shared/reference/flux2-sampler.md §2). The networks are patched to round like ai-toolkit's BFL
modules (flux2_numerics), which bf16 previews need to match its bf16 samples. The reference server
imports ai-toolkit's sampler, so `parity="reference"` renders the same image.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import torch
from PIL import Image

from previewd.catalog import MODELS, snap
from previewd.errors import ConfigError, ControlImageError, NonFiniteOutput, PipelineOutOfMemory
from previewd.pipelines import device as devices
from previewd.pipelines import flux2_lora, flux2_numerics, flux2_sampler, flux2_text, flux2_vae
from previewd.pipelines.base import StepCallback, StopCheck
from previewd.pipelines.sources import resolve_source
from previewd.spec import ModelSource, RenderResult, RenderSpec

CONTROL_ORDER = ("ctrl_img_1", "ctrl_img_2", "ctrl_img_3")
_SEED_LIMIT = 2 ** 31


def control_images(spec: RenderSpec) -> list[Image.Image]:
    """ai-toolkit's order: `ctrl_img`, else `ctrl_img_1`, then `ctrl_img_2` and `ctrl_img_3`."""
    slots = ["ctrl_img" if spec.control("ctrl_img") else "ctrl_img_1", *CONTROL_ORDER[1:]]
    images = []
    for slot in slots:
        control = spec.control(slot)
        if control is None:
            continue
        try:
            with Image.open(control.path) as image:
                images.append(image.convert("RGB"))
        except OSError as exc:
            raise ControlImageError(f"{slot}: cannot open {control.path}: {exc}") from exc
    return images


class Flux2Preview:
    """The `flux2` adapter: hot pipeline, cached prompt embeddings, LoRAs merged in place."""

    def __init__(self, model_id: str, source: ModelSource, *, device: str, dtype: str) -> None:
        self.model_id = model_id
        self.source = source
        self.device = device
        self.dtype_name = dtype
        self.dtype = devices.torch_dtype(dtype)
        self.transformer = None
        self.vae = None
        self.text_encoder = None
        self.processor = None
        self.merger: flux2_lora.LoraMerger | None = None
        self.prompts = flux2_text.PromptCache()

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        if self.transformer is not None:
            return
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        root = resolve_source(self.source.path)
        options = {"torch_dtype": self.dtype, "local_files_only": True}
        try:
            self.transformer = Flux2Transformer2DModel.from_pretrained(root, subfolder="transformer", **options)
            self.vae = AutoencoderKLFlux2.from_pretrained(root, subfolder="vae", **options)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"flux2: cannot load the diffusers-layout model at {root}: {exc}") from exc
        self.transformer.to(self.device).eval().requires_grad_(False)
        self.vae.to(self.device).eval().requires_grad_(False)
        flux2_numerics.match_transformer(self.transformer)
        flux2_numerics.match_vae(self.vae)
        self._load_text_encoder(root)
        self.merger = flux2_lora.LoraMerger(self.transformer)

    def _load_text_encoder(self, model_root: Path) -> None:
        from transformers import AutoProcessor, Mistral3ForConditionalGeneration

        root = resolve_source(self.source.text_encoder) if self.source.text_encoder else model_root
        # A diffusers-layout folder keeps them in subfolders; a plain Mistral repo at its root.
        weights = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tokenizer = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        try:
            encoder = Mistral3ForConditionalGeneration.from_pretrained(weights, dtype=self.dtype,
                                                                       local_files_only=True)
            self.processor = AutoProcessor.from_pretrained(tokenizer, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"flux2: cannot load the Mistral-3 text encoder at {root}: {exc}") from exc
        # ai-toolkit casts the loaded encoder to the model dtype; that also rounds the rotary inv_freq
        # buffers, which from_pretrained keeps in float32, and changes every bf16 embedding.
        encoder.to(self.device, dtype=self.dtype).eval().requires_grad_(False)
        if self.source.quantize_text_encoder == "qfloat8":
            # ai-toolkit quantises every Linear/Conv2d of the encoder (no exclusions), after moving it.
            from optimum.quanto import freeze, qfloat8, quantize

            quantize(encoder, weights=qfloat8)
            freeze(encoder)
        self.text_encoder = encoder

    def unload(self) -> None:
        self.transformer = self.vae = self.text_encoder = self.processor = self.merger = None
        self.prompts.clear()
        devices.free_memory(self.device)

    # -- rendering ---------------------------------------------------------------------------

    def prompt_embeds(self, prompt: str) -> torch.Tensor:
        embeds = self.prompts.get(prompt)
        if embeds is None:
            embeds = flux2_text.encode_prompt(self.text_encoder, self.processor, prompt,
                                              device=self.device, dtype=self.dtype)
            self.prompts.put(prompt, embeds)
        return embeds

    def set_lora(self, spec: RenderSpec) -> dict:
        """Merge `spec.lora` (or restore the base) unless exactly that is already merged."""
        lora = spec.lora
        if lora is None or lora.network_multiplier == 0:
            if self.merger.active is not None:
                self.merger.restore()
            return {"lora": None if lora is None else "multiplier 0: base weights"}
        stat = os.stat(lora.path) if os.path.exists(lora.path) else None
        identity = (lora.path, lora.sha256, stat and (stat.st_size, stat.st_mtime_ns), lora.network_multiplier)
        if self.merger.active != identity:
            self.merger.apply(flux2_lora.read_lora(lora.path), lora.network_multiplier, identity)
        return {"lora": "merged into transformer weights (fp32 merge, cast to model dtype)",
                "lora_sha256": lora.sha256, "network_multiplier": lora.network_multiplier}

    @torch.no_grad()
    def render(self, spec: RenderSpec, *, on_step: StepCallback | None = None,
               should_stop: StopCheck | None = None) -> RenderResult:
        self.load()
        started = time.perf_counter()
        divisor = MODELS[self.model_id].divisor
        width, height = snap(spec.width, divisor), snap(spec.height, divisor)
        seed = secrets.randbelow(_SEED_LIMIT) if spec.seed == -1 else spec.seed
        references = control_images(spec)
        record = {
            "model": self.model_id, "parity": spec.parity, "sampler": "ai-toolkit flux2 (linear mu, Euler)",
            "dtype": self.dtype_name, "device": self.device, "size_divisor": divisor,
            "requested_size": [spec.width, spec.height], "effective_size": [width, height],
            "neg": "unused (FLUX.2-dev is guidance-distilled: no CFG, no negative prompt)",
            "guidance": "embedded", "text_encoder_quantization": self.source.quantize_text_encoder,
            "reference_images": len(references),
        }
        try:
            record.update(self.set_lora(spec))
            lora_done = time.perf_counter()
            embeds = self.prompt_embeds(spec.prompt)
            text_done = time.perf_counter()
            array = self._sample(spec, embeds, width, height, seed, references, record, on_step, should_stop)
        except torch.OutOfMemoryError as exc:
            raise PipelineOutOfMemory(f"flux2: out of memory on {self.device}: {exc}") from exc
        if not torch.isfinite(torch.from_numpy(array)).all():
            raise NonFiniteOutput()
        done = time.perf_counter()
        return RenderResult(image=flux2_vae.to_pil(array), seed=seed, width=width, height=height, record=record,
                            timings={"lora": lora_done - started, "text": text_done - lora_done,
                                     "sample_and_decode": done - text_done, "total": done - started})

    def _sample(self, spec, embeds, width, height, seed, references, record, on_step, should_stop):
        rows, cols = flux2_sampler.latent_grid(width, height)
        sigmas = flux2_sampler.aitk_schedule(spec.sample_steps, rows * cols)
        record["schedule_mu"] = flux2_sampler.schedule_mu(rows * cols)
        noise = flux2_sampler.draw_noise(seed, rows, cols, self.dtype).to(self.device)
        latents = flux2_sampler.pack(noise)
        ids = flux2_sampler.image_ids(rows, cols).to(self.device)
        txt_ids = flux2_sampler.text_ids(embeds.shape[1]).to(self.device)
        guidance = torch.full((1,), spec.guidance_scale, dtype=self.dtype, device=self.device)
        ref_tokens = ref_ids = None
        if references:
            ref_tokens, ref_ids = flux2_vae.encode_references(self.vae, references)
            ref_ids = ref_ids.to(self.device)
        tokens = latents.shape[1]

        def predict(x: torch.Tensor, t: float) -> torch.Tensor:
            x_ids = ids
            if ref_tokens is not None:
                x, x_ids = torch.cat((x, ref_tokens), dim=1), torch.cat((ids, ref_ids))
            out = self.transformer(hidden_states=x, encoder_hidden_states=embeds,
                                   timestep=torch.full((1,), t, dtype=self.dtype, device=self.device),
                                   img_ids=x_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
            return out[:, :tokens]

        latents = flux2_sampler.denoise(predict, latents, sigmas, on_step=on_step, should_stop=should_stop)
        return flux2_vae.decode(self.vae, flux2_sampler.unpack(latents, rows, cols))
