"""Qwen-Image adapters: text-to-image (Qwen-Image, 2512), Edit, and Edit-Plus (2509, 2511).

Two parity profiles (aitk-sampling.md §C):
- `aitk` reproduces ai-toolkit's training samples: its hard-coded scheduler, prompts encoded with
  control tensors at (H, W), BILINEAR edit resize, edit-plus CFG renorm only with `do_cfg_norm`,
  the `ctrl_img` double-encoding quirk, VAE tiling when the job had `low_vram`;
- `reference` reproduces the reference server: the model folder's scheduler, its swapped (W, H)
  text-encoder size, LANCZOS edit resize, stock diffusers edit-plus (always renormalised).
Both floor sizes to 32, draw noise from a CPU generator seeded per image, and pass the guidance as
`true_cfg_scale` with the negative prompt always encoded.

The pipeline stays loaded; prompt embeddings are cached across checkpoints (the LoRA only touches
the transformer); LoRAs are swapped in place (lora_state: hot-swap or unload+load, never a base
reload).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from previewd.catalog import MODELS, snap
from previewd.config import MemoryConfig
from previewd.errors import NonFiniteOutput, PipelineError, RenderInterrupted
from previewd.pipelines import adapter_class
from previewd.pipelines import device as devices
from previewd.pipelines.base import StepCallback, StopCheck, Stopwatch, check_spec
from previewd.pipelines.lora import linear_module_names, load_lora
from previewd.pipelines.lru import LruCache
from previewd.pipelines.memory import MemoryPlan, plan_model, quantization_precision, settings_for
from previewd.pipelines.placement import EncoderVisit, Placer, from_pretrained
from previewd.pipelines.qwen import encode as qwen_encode
from previewd.pipelines.qwen.decode import decode_latents
from previewd.pipelines.qwen.encode import (
    ControlPlan,
    edit_vae_image,
    open_control,
    plan_controls,
    text_encoder_size,
    text_encoder_tensor,
)
from previewd.pipelines.qwen.lora_state import LoraMode, QwenLoraState
from previewd.pipelines.qwen.rotary_dtype import rotary_tables_in
from previewd.pipelines.quantization import Quantization
from previewd.pipelines.quantize import QuantizedModel, quantize_transformer
from previewd.pipelines.runtime_lora import Pair, RuntimeLora
from previewd.spec import NUMBERED_CONTROL_SLOTS, ModelSource, RenderResult, RenderSpec

logger = logging.getLogger(__name__)

AITK_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""ai-toolkit's `qwen_image.scheduler_config`, used for every Qwen variant (§C.2)."""

EMBED_CACHE_SIZE = 32

Embeds = dict[str, torch.Tensor]
"""`prompt_embeds`, `prompt_embeds_mask` and, with CFG, their `negative_` twins: pipeline kwargs."""


@dataclass(frozen=True)
class _Call:
    """What one render asks of the pipeline, settled before anything loads."""

    seed: int
    width: int
    height: int
    controls: ControlPlan | None
    vae_tiling: bool


def _image_digest(img) -> tuple:
    """Identifies a control image by its pixels, so renamed or re-saved files still hit the cache."""
    return img.size, hashlib.sha256(img.tobytes()).hexdigest()


class _QwenPreview:
    """Shared machinery; subclasses say how prompts are encoded and how the pipeline is called."""

    control_kind = "none"

    def __init__(self, model_id: str, source: ModelSource, *, device: str, dtype: str,
                 quantization: Quantization | None = None) -> None:
        if model_id not in MODELS or adapter_class(model_id) is not type(self):
            raise PipelineError(f"{type(self).__name__} cannot render model id {model_id!r}")
        self.model_id = model_id
        self.info = MODELS[model_id]
        self.source = source
        self.device = device
        self.dtype = dtype
        self.pipe = None
        self.lora: QwenLoraState | None = None
        self.quantization = quantization or Quantization.configured(source)
        self.quantized: QuantizedModel | None = None
        self.runtime_lora: RuntimeLora | None = None
        """ai-toolkit's runtime LoRA branch (quantised or unmerged runs); exclusive with `lora`'s peft adapter."""
        self._hub_scheduler_config: dict[str, Any] | None = None
        self._embeds: LruCache[tuple, tuple[torch.Tensor, torch.Tensor]] = LruCache(EMBED_CACHE_SIZE)
        self.plan: MemoryPlan | None = None
        self._placer = Placer(None, device)
        self._visit: EncoderVisit | None = None
        self.prebuilt = None
        """Builds components instead of reading them (placement.from_pretrained); bench/gpu.py sets it."""
        self._offloaded_text_encoder = None
        """te_offload: the encoder, kept out of the pipeline (so its device never decides where the
        pipeline computes) and in host memory except while it encodes."""

    # -- lifecycle -----------------------------------------------------------------------------

    def _pipeline_class(self):
        raise NotImplementedError

    def plan_memory(self, memory: MemoryConfig, lora_path: str | None = None) -> MemoryPlan:
        """Choose where the components go (before `load`), for the configured memory settings."""
        self.plan = plan_model(self.model_id, self.source, device=self.device, dtype=self.dtype,
                               settings=settings_for(memory, self.device),
                               run_precision=quantization_precision(self.quantization), lora_path=lora_path)
        return self.plan

    def _text_encoder_overrides(self, placer: Placer) -> dict[str, Any]:
        """Text encoder (+ tokenizer/processor) from `source.text_encoder`, when set, or placed by the plan."""
        te_path = self.source.text_encoder
        placed = placer.load_kwargs("text_encoder")
        if not te_path and not placed:
            return {}
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        kwargs = {"local_files_only": True}
        parts = {"text_encoder": from_pretrained(
            self.prebuilt, "text_encoder", Qwen2_5_VLForConditionalGeneration, te_path or self.source.path,
            subfolder="text_encoder", dtype=devices.torch_dtype(self.dtype), **placed, **kwargs)}
        if not te_path:
            return parts
        parts["tokenizer"] = Qwen2Tokenizer.from_pretrained(te_path, subfolder="tokenizer", **kwargs)
        if self.control_kind != "none":
            parts["processor"] = AutoProcessor.from_pretrained(te_path, subfolder="processor", **kwargs)
        return parts

    def _placed_components(self, placer: Placer) -> dict[str, Any]:
        """Transformer and VAE loaded straight onto the device the plan gives them (on a GPU)."""
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        parts = {}
        for name, cls in (("transformer", QwenImageTransformer2DModel), ("vae", AutoencoderKLQwenImage)):
            placed = placer.load_kwargs(name)
            if placed:
                parts[name] = from_pretrained(self.prebuilt, name, cls, self.source.path, subfolder=name,
                                              local_files_only=True, torch_dtype=devices.torch_dtype(self.dtype),
                                              **placed)
        return parts

    def load(self) -> None:
        if self.pipe is not None:
            return
        placer = Placer(self.plan, self.device)
        with devices.raise_oom_as(self.model_id, self.device):
            cls = self._pipeline_class()
            pipe = from_pretrained(self.prebuilt, "pipeline", cls, self.source.path,
                                   dtype=devices.torch_dtype(self.dtype), local_files_only=True,
                                   **self._placed_components(placer), **self._text_encoder_overrides(placer))
            self.quantized = quantize_transformer(self.quantization, pipe.transformer,
                                                  dtype=devices.torch_dtype(self.dtype),
                                                  read_ara=partial(_branch_pairs, pipe.transformer))
            self.quantized.quantize_text_encoder(pipe.text_encoder)
            placer.quantize_to_fit("transformer", pipe.transformer)
            placer.quantize_to_fit("text_encoder", pipe.text_encoder)
            placer.install_pipeline(pipe)
            if placer.placement == "te_offload":
                self._offloaded_text_encoder = pipe.text_encoder
                pipe.register_modules(text_encoder=None)
        pipe.set_progress_bar_config(disable=True)
        self._hub_scheduler_config = dict(pipe.scheduler.config)
        self.lora = QwenLoraState(pipe, model_id=self.model_id, source_path=self.source.path)
        self.runtime_lora = RuntimeLora(pipe.transformer, partial(_branch_pairs, pipe.transformer))
        self.pipe, self._placer = pipe, placer

    def unload(self) -> None:
        self.pipe = None
        self.lora = None
        self.quantized = None
        self.runtime_lora = None
        self._offloaded_text_encoder = None
        self._placer = Placer(None, self.device)
        self._embeds.clear()
        devices.free_memory(self.device)

    # -- rendering -----------------------------------------------------------------------------

    def render(self, spec: RenderSpec, *, on_step: StepCallback | None = None,
               should_stop: StopCheck | None = None) -> RenderResult:
        clock = Stopwatch()
        # 1. Check inputs
        self.check(spec)
        call = self.prepare_call(spec)
        with devices.raise_oom_as(self.model_id, self.device):
            # 2. Load the model and apply the LoRA
            self.load()
            clock.lap("load")
            lora_record = self._apply_lora(spec)
            clock.lap("lora")
            # 3. Encode prompt
            embeds = self.encode_prompt(spec, call)
            clock.lap("encode")
            with self._vae_tiling(call):
                # 4. Denoise
                latents, call_record = self.denoise(spec, call, embeds, on_step, should_stop)
                clock.lap("denoise")
                # 5. Decode
                image = self.decode(spec, call, latents)
                clock.lap("decode")
        # 6. Record
        record = self.make_record(spec, call, lora_record, call_record)
        return RenderResult(image=image, seed=call.seed, width=call.width, height=call.height, record=record,
                            timings=clock.timings())

    def check(self, spec: RenderSpec) -> None:
        """Refuse what cannot render, before anything loads."""
        check_spec(spec, self.model_id, self._control_problems(spec) + self.quantization.refusals(spec, self.source))

    def _control_problems(self, spec: RenderSpec) -> list[str]:
        problems = []
        slots = [c.slot for c in spec.control_images]
        if len(slots) != len(set(slots)):
            problems.append("control_images: a slot is given more than once")
        if self.control_kind == "single" and set(slots) - {"ctrl_img"}:
            problems.append(f"control_images: {self.model_id} takes only `ctrl_img` "
                            f"(got {', '.join(sorted(slots))})")
        if self.control_kind == "multi":
            numbered = [s for s in NUMBERED_CONTROL_SLOTS if s in slots]
            expected = list(NUMBERED_CONTROL_SLOTS[: len(numbered)])
            if numbered and numbered != expected:
                problems.append(f"control_images: slots must be filled in order from ctrl_img_1 "
                                f"(got {', '.join(numbered)})")
        return problems

    def prepare_call(self, spec: RenderSpec) -> _Call:
        """Seed, size floored to the divisor, and the control images opened and routed."""
        images = {c.slot: open_control(c.path) for c in spec.control_images}
        return _Call(seed=spec.seed if spec.seed >= 0 else secrets.randbelow(2**32),
                     width=snap(spec.width, self.info.divisor), height=snap(spec.height, self.info.divisor),
                     controls=plan_controls(spec, self.control_kind, images) if self.control_kind != "none" else None,
                     vae_tiling=spec.parity == "aitk" and spec.aitk.vae_tiling)

    def _lora_mode(self, spec: RenderSpec) -> LoraMode | Literal["branch"]:
        """aitk: as ai-toolkit sampled (merged, or its runtime branch for quantised or unmerged runs; it
        never merges into a quantised model); reference: the seeds' per-model choice (fused for
        2512/2511, adapters for edit/2509)."""
        if spec.parity == "aitk":
            return "fuse" if spec.aitk.lora_merged and self.quantization.transformer is None else "branch"
        return "fuse" if self.info.lora_mode == "fuse" else "adapter"

    def _apply_lora(self, spec: RenderSpec) -> dict[str, Any] | None:
        """The LoRA as ai-toolkit's runtime branch, or through peft (fused, or an adapter); never both."""
        mode = self._lora_mode(spec)
        if mode == "branch":
            self.lora.apply(None)
            return self.runtime_lora.apply(spec.lora)
        self.runtime_lora.clear()
        return self.lora.apply(spec.lora, mode)

    def encode_prompt(self, spec: RenderSpec, call: _Call) -> Embeds:
        """The prompt's embeddings and, with CFG, the negative prompt's; cached across renders."""
        plan = call.controls
        digests = () if plan is None else tuple(_image_digest(img) for _slot, img in plan.text_encoder)
        embeds = {}
        with EncoderVisit(self._bring_text_encoder) as self._visit:
            try:
                embeds["prompt_embeds"], embeds["prompt_embeds_mask"] = self._encode(spec.prompt, spec, plan,
                                                                                     digests)
                if spec.guidance_scale > 1:
                    embeds["negative_prompt_embeds"], embeds["negative_prompt_embeds_mask"] = self._encode(
                        spec.neg, spec, plan, digests)
            finally:
                self._visit = None
        return embeds

    def _cached_embeds(self, key: tuple, compute, parity: str) -> tuple[torch.Tensor, torch.Tensor]:
        def with_mask() -> tuple[torch.Tensor, torch.Tensor]:
            with self._text_encoder_on_device():
                rotary = (rotary_tables_in(self.pipe.text_encoder, devices.torch_dtype(self.dtype))
                          if parity == "aitk" else nullcontext())
                with rotary:
                    embeds, mask = compute()
            if mask is None:
                # ai-toolkit keeps an explicit all-ones mask; the pipelines turn it back into None.
                mask = torch.ones(embeds.shape[:2], dtype=torch.int64, device=embeds.device)
            return embeds, mask

        return self._embeds.get_or_compute((parity, *key), with_mask)

    def _encode(self, text: str, spec: RenderSpec, plan: ControlPlan | None,
                images_key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @contextmanager
    def _text_encoder_on_device(self) -> Iterator[None]:
        """The encoder ready to encode; offloaded, it stays on the device until this render's prompts
        are encoded (encode_prompt's visit)."""
        if self._visit is not None:
            self._visit.need()
        yield

    @contextmanager
    def _bring_text_encoder(self) -> Iterator[None]:
        """te_offload: the encoder back in the pipeline and on the device, then home again."""
        encoder = self._offloaded_text_encoder
        if encoder is None:
            yield
            return
        with self._placer.encoding(encoder, [self.pipe.transformer, self.pipe.vae]):
            self.pipe.register_modules(text_encoder=encoder)
            try:
                yield
            finally:
                self.pipe.register_modules(text_encoder=None)

    @contextmanager
    def _vae_tiling(self, call: _Call) -> Iterator[None]:
        """VAE tiling around denoise and decode when the ai-toolkit job had `low_vram`."""
        if not call.vae_tiling:
            yield
            return
        self.pipe.vae.enable_tiling()
        try:
            yield
        finally:
            self.pipe.vae.disable_tiling()

    def _scheduler(self, parity: str):
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = AITK_SCHEDULER if parity == "aitk" else self._hub_scheduler_config
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def denoise(self, spec: RenderSpec, call: _Call, embeds: Embeds, on_step: StepCallback | None,
                should_stop: StopCheck | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Packed latents after the last step, and what the record says of the loop."""
        self.pipe.scheduler = self._scheduler(spec.parity)
        if should_stop is not None and should_stop():
            raise RenderInterrupted(f"{spec.model}: stopped before denoising")
        generator = torch.Generator("cpu").manual_seed(call.seed)
        return self._run_pipeline(spec, call, embeds, generator, _step_callback(spec, on_step, should_stop))

    def _run_pipeline(self, spec: RenderSpec, call: _Call, embeds: Embeds, generator: torch.Generator,
                      callback) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def decode(self, spec: RenderSpec, call: _Call, latents: torch.Tensor) -> Image.Image:
        array = decode_latents(self.pipe, latents, call.height, call.width)
        if not np.isfinite(array).all():
            raise NonFiniteOutput(f"{spec.model}: the decoded image is not finite")
        return self.pipe.numpy_to_pil(array)[0]

    def _te_record(self, spec: RenderSpec, plan: ControlPlan | None) -> dict[str, Any]:
        return {}

    def make_record(self, spec: RenderSpec, call: _Call, lora_record: dict[str, Any] | None,
                    call_record: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": spec.model,
            "parity": spec.parity,
            "pipeline": type(self.pipe).__name__,
            "source": self.source.path,
            "device": self.device,
            "dtype": self.dtype,
            "quantization": self.quantized.record(),
            **self._placer.record(),
            "prompt": spec.prompt,
            "neg": spec.neg,
            "seed": call.seed,
            "generator": "torch.Generator('cpu').manual_seed(seed), one per image",
            "requested_size": [spec.width, spec.height],
            "size": [call.width, call.height],
            "size_divisor": self.info.divisor,
            "steps": spec.sample_steps,
            "true_cfg_scale": spec.guidance_scale,
            "cfg": spec.guidance_scale > 1,
            "scheduler": {"source": "aitk-hardcoded" if spec.parity == "aitk" else "model-folder",
                          "class": type(self.pipe.scheduler).__name__,
                          "config": {k: v for k, v in self.pipe.scheduler.config.items()
                                     if not k.startswith("_")}},
            "vae_tiling": call.vae_tiling,
            "lora": lora_record,
            **self._te_record(spec, call.controls),
            **call_record,
        }


def _branch_pairs(transformer: torch.nn.Module, path) -> dict[str, Pair]:
    """(down, up) per transformer layer of a LoRA file (a checkpoint, or an accuracy recovery adapter),
    keyed by the Linear layer's path: inside a peft wrapper left from an earlier render, its base layer."""
    layers = {name.removesuffix(".base_layer"): name for name in linear_module_names(transformer)}
    weights = load_lora(path, module_names=set(layers))
    if weights.unmatched:
        logger.warning("%s: %d LoRA module(s) match nothing in the transformer and are skipped: %s", path,
                       len(weights.unmatched), ", ".join(weights.unmatched[:5]))
    return {layers[module]: (weights.state_dict[f"transformer.{module}.lora_A.weight"],
                             weights.state_dict[f"transformer.{module}.lora_B.weight"])
            for module in weights.modules}


def _step_callback(spec: RenderSpec, on_step: StepCallback | None, should_stop: StopCheck | None):
    """The pipelines' `callback_on_step_end`: refuses non-finite latents, reports progress, stops."""
    total = spec.sample_steps

    def callback(pipe, i, t, kwargs):
        latents = kwargs["latents"]
        if not torch.isfinite(latents).all():
            raise NonFiniteOutput(f"{spec.model}: latents became non-finite at step {i + 1}/{total} "
                                  "(a 1-step Qwen schedule has a NaN sigma)")
        if on_step is not None:
            on_step(i + 1, total)
        if should_stop is not None and should_stop():
            raise RenderInterrupted(f"{spec.model}: stopped after step {i + 1}/{total}")
        return {"latents": latents}

    return callback


class QwenImagePreview(_QwenPreview):
    """Qwen-Image and Qwen-Image-2512: text to image."""

    control_kind = "none"

    def _pipeline_class(self):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    def _encode(self, text, spec, plan, images_key):
        key = ("t2i", text)
        return self._cached_embeds(key, lambda: self.pipe.encode_prompt(text, device=self.pipe._execution_device,
                                                                        num_images_per_prompt=1), spec.parity)

    def _run_pipeline(self, spec, call, embeds, generator, callback):
        out = self.pipe(**embeds, height=call.height, width=call.width, num_inference_steps=spec.sample_steps,
                        true_cfg_scale=spec.guidance_scale, generator=generator, output_type="latent",
                        callback_on_step_end=callback)
        return out.images, {"cfg_renorm": spec.guidance_scale > 1}


class _QwenEditBase(_QwenPreview):
    def _te_area(self) -> int:
        return qwen_encode.EDIT_TE_AREA

    def _te_images(self, plan: ControlPlan, spec: RenderSpec):
        dtype = devices.torch_dtype(self.dtype)
        device = self.pipe._execution_device
        return [text_encoder_tensor(img, self._te_area(), spec.parity, device, dtype)
                for _slot, img in plan.text_encoder]

    def _encode(self, text, spec, plan, images_key):
        key = (self.control_kind, self._te_area(), text, images_key)

        def compute():
            tensors = self._te_images(plan, spec)
            image = tensors if self.control_kind == "multi" else tensors[0]
            return self.pipe.encode_prompt(text, image=image, device=self.pipe._execution_device,
                                           num_images_per_prompt=1)

        return self._cached_embeds(key, compute, spec.parity)

    def _te_record(self, spec, plan):
        return {"text_encoder_images": [
            {"slot": slot, "source_size": [img.width, img.height],
             "tensor_hw": list(text_encoder_size(img.width, img.height, self._te_area(), spec.parity)),
             "resize": "F.interpolate bilinear"}
            for slot, img in plan.text_encoder]}


class QwenImageEditPreview(_QwenEditBase):
    """Qwen-Image-Edit: one control image in `ctrl_img`."""

    control_kind = "single"

    def _pipeline_class(self):
        from previewd.pipelines.qwen.vae_cache import QwenEditCachedPipeline

        return QwenEditCachedPipeline

    def _run_pipeline(self, spec, call, embeds, generator, callback):
        (_slot, img), = call.controls.vae
        vae_img, kernel = edit_vae_image(img, call.width, call.height, spec.parity)
        out = self.pipe(image=vae_img, **embeds, height=call.height, width=call.width,
                        num_inference_steps=spec.sample_steps, true_cfg_scale=spec.guidance_scale,
                        generator=generator, output_type="latent", callback_on_step_end=callback)
        return out.images, {"cfg_renorm": spec.guidance_scale > 1,
                            "vae_images": [{"slot": "ctrl_img", "resize_to_output": kernel,
                                            "then": "diffusers LANCZOS to ~1 MP"}]}


class QwenImageEditPlusPreview(_QwenEditBase):
    """Qwen-Image-Edit-2509 and -2511: one to three control images, `ctrl_img_1`..`_3`."""

    control_kind = "multi"

    def _te_area(self) -> int:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as stock

        return stock.CONDITION_IMAGE_SIZE

    def _pipeline_class(self):
        from previewd.pipelines.qwen.edit_plus_loop import QwenEditPlusCfgNormPipeline

        return QwenEditPlusCfgNormPipeline

    def _run_pipeline(self, spec, call, embeds, generator, callback):
        vae_images = [img for _slot, img in call.controls.vae]
        do_cfg = spec.guidance_scale > 1
        common = dict(height=call.height, width=call.width, num_inference_steps=spec.sample_steps,
                      true_cfg_scale=spec.guidance_scale, generator=generator, callback_on_step_end=callback)
        if spec.parity == "reference":
            latents = self.pipe(image=vae_images, **embeds, **common, output_type="latent").images
            renorm, loop = do_cfg, "diffusers QwenImageEditPlusPipeline"
        else:
            negatives = {k: embeds.get(k) for k in ("negative_prompt_embeds", "negative_prompt_embeds_mask")}
            latents = self.pipe.sample(vae_images, prompt_embeds=embeds["prompt_embeds"],
                                       prompt_embeds_mask=embeds["prompt_embeds_mask"], **negatives, **common,
                                       cfg_norm=spec.aitk.do_cfg_norm)
            renorm, loop = do_cfg and spec.aitk.do_cfg_norm, "previewd aitk edit-plus loop"
        return latents, {"cfg_renorm": renorm, "denoise_loop": loop,
                         "vae_images": [{"slot": slot, "source_size": [img.width, img.height],
                                         "resize": "diffusers LANCZOS to ~1 MP"} for slot, img in call.controls.vae]}
