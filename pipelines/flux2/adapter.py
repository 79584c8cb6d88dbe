"""FLUX.2-dev rendered the way ai-toolkit samples it, without an ai-toolkit checkout.

diffusers supplies the networks (Flux2Transformer2DModel, AutoencoderKLFlux2) and transformers the
Mistral-3 text encoder; the sampling itself is previewd's (sampler), because diffusers'
Flux2Pipeline uses another schedule, timestep rounding and Euler precision
(../shared/reference/flux2-sampler.md §2). The networks are patched to round like ai-toolkit's BFL
modules (numerics), which bf16 previews need to match its bf16 samples. The reference server
imports ai-toolkit's sampler, so `parity="reference"` renders the same image.
"""

from __future__ import annotations

import os
import secrets
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from previewd.catalog import MODELS, snap
from previewd.config import MemoryConfig
from previewd.errors import ConfigError, ControlImageError, NonFiniteOutput
from previewd.pipelines import device as devices
from previewd.pipelines.base import StepCallback, StopCheck, Stopwatch, check_spec
from previewd.pipelines.base_weights import BaseWeights
from previewd.pipelines.flux2 import lora as flux2_lora
from previewd.pipelines.flux2 import numerics, sampler
from previewd.pipelines.flux2 import text as flux2_text
from previewd.pipelines.flux2 import vae as flux2_vae
from previewd.pipelines.lru import LruCache
from previewd.pipelines.memory import MemoryPlan, plan_model, quantization_precision, settings_for
from previewd.pipelines.model_sources import resolve_source
from previewd.pipelines.placement import Placer, from_pretrained
from previewd.pipelines.quantization import Quantization
from previewd.pipelines.quantize import QuantizedModel, quantize_transformer
from previewd.pipelines.runtime_lora import Pair, RuntimeLora
from previewd.spec import NUMBERED_CONTROL_SLOTS, ModelSource, RenderResult, RenderSpec

PROMPT_CACHE_SIZE = 32
_SEED_LIMIT = 2 ** 31


def _branch_pairs(transformer, path) -> dict[str, Pair]:
    """(down, up) per diffusers Linear layer of an ai-toolkit FLUX.2 LoRA file (a checkpoint or an
    accuracy recovery adapter, BFL module names)."""
    return flux2_lora.branch_pairs(flux2_lora.read_lora(str(path)), transformer)


def control_images(spec: RenderSpec) -> list[Image.Image]:
    """ai-toolkit's order: `ctrl_img`, else `ctrl_img_1`, then `ctrl_img_2` and `ctrl_img_3`."""
    slots = ["ctrl_img" if spec.control("ctrl_img") else "ctrl_img_1", *NUMBERED_CONTROL_SLOTS[1:]]
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


@dataclass(frozen=True)
class _Call:
    """What one render asks of the model, settled before anything loads."""

    seed: int
    width: int
    height: int
    references: list[Image.Image]


@dataclass
class _Latents:
    """Packed noise and the token ids and reference tokens the transformer sees beside it."""

    tokens: torch.Tensor
    rows: int
    cols: int
    ids: torch.Tensor
    text_ids: torch.Tensor
    ref_tokens: torch.Tensor | None
    ref_ids: torch.Tensor | None


class Flux2Preview:
    """The `flux2` adapter: hot pipeline, cached prompt embeddings, LoRAs merged in place."""

    def __init__(self, model_id: str, source: ModelSource, *, device: str, dtype: str,
                 quantization: Quantization | None = None) -> None:
        self.model_id = model_id
        self.source = source
        self.device = device
        self.dtype_name = dtype
        self.dtype = devices.torch_dtype(dtype)
        self.divisor = MODELS[model_id].divisor
        self.transformer = None
        self.vae = None
        self.text_encoder = None
        self.processor = None
        self.merger: flux2_lora.LoraMerger | None = None
        self.quantization = quantization or Quantization.configured(source)
        self.quantized: QuantizedModel | None = None
        self.runtime_lora: RuntimeLora | None = None
        """ai-toolkit's runtime LoRA branch (quantised or unmerged runs); the merger's LoRA otherwise."""
        self.prompts: LruCache[str, torch.Tensor] = LruCache(PROMPT_CACHE_SIZE)
        self.plan: MemoryPlan | None = None
        self._placer = Placer(None, device)
        self.prebuilt = None
        """Builds components instead of reading them (placement.from_pretrained); bench/gpu.py sets it."""
        """Valid across LoRA switches: LoRAs touch only the transformer."""

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        if self.transformer is not None:
            return
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        root = resolve_source(self.source.path)
        options = {"torch_dtype": self.dtype, "local_files_only": True}
        placer = Placer(self.plan, self.device)
        with devices.raise_oom_as(self.model_id, self.device):
            try:
                transformer = from_pretrained(self.prebuilt, "transformer", Flux2Transformer2DModel, root,
                                              subfolder="transformer", **options, **placer.load_kwargs("transformer"))
                self.vae = from_pretrained(self.prebuilt, "vae", AutoencoderKLFlux2, root, subfolder="vae", **options,
                                           **placer.load_kwargs("vae"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"flux2: cannot load the diffusers-layout model at {root}: {exc}") from exc
            transformer.to(placer.home("transformer")).eval().requires_grad_(False)
            self.vae.to(placer.home("vae")).eval().requires_grad_(False)
            numerics.match_transformer(transformer)
            numerics.match_vae(self.vae)
            self.quantized = quantize_transformer(self.quantization, transformer, dtype=self.dtype,
                                                  read_ara=partial(_branch_pairs, transformer))
            placer.quantize_to_fit("transformer", transformer)
            self._load_text_encoder(root, placer)
            placer.install_modules(text_encoder=self.text_encoder, transformer=transformer, vae=self.vae)
        self.merger = flux2_lora.LoraMerger(transformer, BaseWeights.find(root / "transformer"))
        self.runtime_lora = RuntimeLora(transformer, partial(_branch_pairs, transformer))
        self.transformer, self._placer = transformer, placer

    def plan_memory(self, memory: MemoryConfig, lora_path: str | None = None) -> MemoryPlan:
        """Choose where the components go (before `load`), for the configured memory settings."""
        self.plan = plan_model(self.model_id, self.source, device=self.device, dtype=self.dtype_name,
                               settings=settings_for(memory, self.device),
                               run_precision=quantization_precision(self.quantization), lora_path=lora_path)
        return self.plan

    def _load_text_encoder(self, model_root: Path, placer: Placer) -> None:
        from transformers import AutoProcessor, Mistral3ForConditionalGeneration

        root = resolve_source(self.source.text_encoder) if self.source.text_encoder else model_root
        # A diffusers-layout folder keeps them in subfolders; a plain Mistral repo at its root.
        weights = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tokenizer = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        quantized = self.quantization.text_encoder is not None
        # A quantised encoder is quantised in host memory: its full-precision weights never reach the GPU.
        placed = {} if quantized else placer.load_kwargs("text_encoder")
        try:
            encoder = from_pretrained(self.prebuilt, "text_encoder", Mistral3ForConditionalGeneration, weights,
                                      dtype=self.dtype, local_files_only=True, **placed)
            self.processor = from_pretrained(self.prebuilt, "processor", AutoProcessor, tokenizer,
                                             local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"flux2: cannot load the Mistral-3 text encoder at {root}: {exc}") from exc
        # ai-toolkit casts the loaded encoder to the model dtype; that also rounds the rotary inv_freq
        # buffers, which from_pretrained keeps in float32, and changes every bf16 embedding.
        encoder.to(dtype=self.dtype).eval().requires_grad_(False)
        # ai-toolkit quantises every Linear of the encoder (no exclusions) with the transformer's qtype;
        # the scales and casts are exact elementwise operations, the same in host memory as on the GPU.
        self.quantized.quantize_text_encoder(encoder)
        placer.quantize_to_fit("text_encoder", encoder)
        self.text_encoder = encoder.to(placer.home("text_encoder"))

    def unload(self) -> None:
        self.transformer = self.vae = self.text_encoder = self.processor = self.merger = None
        self.quantized = self.runtime_lora = None
        self._placer = Placer(None, self.device)
        self.prompts.clear()
        devices.free_memory(self.device)

    # -- rendering ---------------------------------------------------------------------------

    @torch.no_grad()
    def render(self, spec: RenderSpec, *, on_step: StepCallback | None = None,
               should_stop: StopCheck | None = None) -> RenderResult:
        clock = Stopwatch()
        # 1. Check inputs
        call = self.check_inputs(spec)
        with devices.raise_oom_as(self.model_id, self.device):
            # 2. Load the model and apply the LoRA
            self.load()
            clock.lap("load")
            # Under model offload the transformer comes to the device first: the merge runs there, as resident.
            self._placer.stage("transformer")
            lora_record = self.set_lora(spec)
            clock.lap("lora")
            # 3. Encode prompt
            embeds = self.encode_prompt(spec.prompt)
            clock.lap("encode")
            # 4. Prepare latents
            self._placer.stage("vae")
            latents = self.prepare_latents(call, embeds)
            clock.lap("latents")
            # 5. Denoise
            self._placer.stage("transformer")
            tokens = self.denoise(spec, embeds, latents, on_step, should_stop)
            clock.lap("denoise")
            # 6. Decode
            self._placer.stage("vae")
            image = self.decode(tokens, latents)
            clock.lap("decode")
        # 7. Record
        record = self.make_record(spec, call, latents, lora_record)
        return RenderResult(image=image, seed=call.seed, width=call.width, height=call.height, record=record,
                            timings=clock.timings())

    def check_inputs(self, spec: RenderSpec) -> _Call:
        """Refuse what cannot render; seed, size floored to the divisor, reference images opened."""
        check_spec(spec, self.model_id, self.quantization.refusals(spec, self.source))
        return _Call(seed=secrets.randbelow(_SEED_LIMIT) if spec.seed == -1 else spec.seed,
                     width=snap(spec.width, self.divisor), height=snap(spec.height, self.divisor),
                     references=control_images(spec))

    def set_lora(self, spec: RenderSpec) -> dict:
        """ai-toolkit's runtime branch for quantised or unmerged runs (it never merges into a quantised
        model); otherwise merge `spec.lora` (or restore the base) unless exactly that is already merged."""
        lora = spec.lora
        if spec.parity == "aitk" and (not spec.aitk.lora_merged or self.quantization.transformer is not None):
            if self.merger.active is not None:
                self.merger.restore()
            return {"lora": self.runtime_lora.apply(lora)}
        self.runtime_lora.clear()
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

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        def encode() -> torch.Tensor:
            self._placer.stage("text_encoder")
            with self._placer.encoding(self.text_encoder, [self.transformer, self.vae]):
                return flux2_text.encode_prompt(self.text_encoder, self.processor, prompt, device=self.device,
                                                dtype=self.dtype)

        return self.prompts.get_or_compute(prompt, encode)

    def prepare_latents(self, call: _Call, embeds: torch.Tensor) -> _Latents:
        rows, cols = sampler.latent_grid(call.width, call.height)
        noise = sampler.draw_noise(call.seed, rows, cols, self.dtype).to(self.device)
        ref_tokens = ref_ids = None
        if call.references:
            ref_tokens, ref_ids = flux2_vae.encode_references(self.vae, call.references)
            ref_ids = ref_ids.to(self.device)
        return _Latents(tokens=sampler.pack(noise), rows=rows, cols=cols,
                        ids=sampler.image_ids(rows, cols).to(self.device),
                        text_ids=sampler.text_ids(embeds.shape[1]).to(self.device),
                        ref_tokens=ref_tokens, ref_ids=ref_ids)

    def denoise(self, spec: RenderSpec, embeds: torch.Tensor, latents: _Latents, on_step: StepCallback | None,
                should_stop: StopCheck | None) -> torch.Tensor:
        sigmas = sampler.aitk_schedule(spec.sample_steps, latents.rows * latents.cols)
        guidance = torch.full((1,), spec.guidance_scale, dtype=self.dtype, device=self.device)
        image_tokens = latents.tokens.shape[1]

        def predict(x: torch.Tensor, t: float) -> torch.Tensor:
            x_ids = latents.ids
            if latents.ref_tokens is not None:
                x, x_ids = torch.cat((x, latents.ref_tokens), dim=1), torch.cat((latents.ids, latents.ref_ids))
            out = self.transformer(hidden_states=x, encoder_hidden_states=embeds,
                                   timestep=torch.full((1,), t, dtype=self.dtype, device=self.device),
                                   img_ids=x_ids, txt_ids=latents.text_ids, guidance=guidance,
                                   return_dict=False)[0]
            return out[:, :image_tokens]

        return sampler.denoise(predict, latents.tokens, sigmas, on_step=on_step, should_stop=should_stop)

    def decode(self, tokens: torch.Tensor, latents: _Latents) -> Image.Image:
        array = flux2_vae.decode(self.vae, sampler.unpack(tokens, latents.rows, latents.cols))
        if not np.isfinite(array).all():
            raise NonFiniteOutput()
        return flux2_vae.to_pil(array)

    def make_record(self, spec: RenderSpec, call: _Call, latents: _Latents, lora_record: dict) -> dict:
        return {
            "model": self.model_id, "parity": spec.parity, "sampler": "ai-toolkit flux2 (linear mu, Euler)",
            "dtype": self.dtype_name, "device": self.device, "size_divisor": self.divisor,
            "requested_size": [spec.width, spec.height], "effective_size": [call.width, call.height],
            "neg": "unused (FLUX.2-dev is guidance-distilled: no CFG, no negative prompt)",
            "guidance": "embedded", "quantization": self.quantized.record(),
            **self._placer.record(),
            "reference_images": len(call.references),
            **lora_record,
            "schedule_mu": sampler.schedule_mu(latents.rows * latents.cols),
        }
