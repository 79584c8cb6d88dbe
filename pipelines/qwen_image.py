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
the transformer); LoRAs are swapped in place (hot-swap or unload+load, never a base reload).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from previewd.catalog import MODELS, snap, validate_spec
from previewd.errors import LoraError, NonFiniteOutput, PipelineError, RenderInterrupted
from previewd.pipelines import device as devices
from previewd.pipelines.base import StepCallback, StopCheck
from previewd.pipelines.base_weights import BaseWeights
from previewd.pipelines.lora import LoraWeights, linear_module_names, load_lora
from previewd.pipelines.sources import resolve_source
from previewd.pipelines import qwen_encode
from previewd.pipelines.qwen_encode import (
    ControlPlan,
    edit_vae_image,
    open_control,
    plan_controls,
    text_encoder_size,
    text_encoder_tensor,
)
from previewd.spec import LoraSpec, ModelSource, RenderResult, RenderSpec

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

DIVISOR = 32
ADAPTER = "preview"
EMBED_CACHE_SIZE = 32


@dataclass
class _LoadedLora:
    key: tuple
    path: str
    sha256: str | None
    signature: tuple
    modules: tuple[str, ...]
    weights_info: dict[str, Any]
    fused_at: float | None = None
    scale: float | None = None


def _image_digest(img) -> tuple:
    """Identifies a control image by its pixels, so renamed or re-saved files still hit the cache."""
    return img.size, hashlib.sha256(img.tobytes()).hexdigest()


class _QwenPreview:
    """Shared machinery; subclasses say how prompts are encoded and how the pipeline is called."""

    control_kind = "none"

    def __init__(self, model_id: str, source: ModelSource, *, device: str, dtype: str) -> None:
        from previewd.pipelines import adapter_class

        if model_id not in MODELS or adapter_class(model_id) is not type(self):
            raise PipelineError(f"{type(self).__name__} cannot render model id {model_id!r}")
        self.model_id = model_id
        self.info = MODELS[model_id]
        self.source = source
        self.device = device
        self.dtype = dtype
        self.pipe = None
        self._hub_scheduler_config: dict[str, Any] | None = None
        self._module_names: set[str] = set()
        self._lora: _LoadedLora | None = None
        self._base_weights: BaseWeights | None | bool = False  # False: not looked up yet
        self._embeds: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    # -- lifecycle -----------------------------------------------------------------------------

    def _pipeline_class(self):
        raise NotImplementedError

    def _text_encoder_overrides(self) -> dict[str, Any]:
        """Text encoder (+ tokenizer/processor) from `source.text_encoder`, when set."""
        te_path = self.source.text_encoder
        if not te_path:
            return {}
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        kwargs = {"local_files_only": True}
        parts = {
            "text_encoder": Qwen2_5_VLForConditionalGeneration.from_pretrained(
                te_path, subfolder="text_encoder", dtype=devices.torch_dtype(self.dtype), **kwargs),
            "tokenizer": Qwen2Tokenizer.from_pretrained(te_path, subfolder="tokenizer", **kwargs),
        }
        if self.control_kind != "none":
            parts["processor"] = AutoProcessor.from_pretrained(te_path, subfolder="processor", **kwargs)
        return parts

    def load(self) -> None:
        if self.pipe is not None:
            return
        started = time.perf_counter()
        cls = self._pipeline_class()
        pipe = cls.from_pretrained(self.source.path, dtype=devices.torch_dtype(self.dtype),
                                   local_files_only=True, **self._text_encoder_overrides())
        if self.source.quantize_text_encoder == "qfloat8":
            from optimum.quanto import freeze, qfloat8, quantize

            quantize(pipe.text_encoder, weights=qfloat8)
            freeze(pipe.text_encoder)
        if self.device != "cpu":
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self._hub_scheduler_config = dict(pipe.scheduler.config)
        self._module_names = linear_module_names(pipe.transformer)
        self.pipe = pipe
        logger.info("loaded %s from %s in %.1f s", self.model_id, self.source.path,
                    time.perf_counter() - started)

    def unload(self) -> None:
        self.pipe = None
        self._lora = None
        self._embeds.clear()
        devices.free_memory(self.device)

    # -- validation ----------------------------------------------------------------------------

    def check(self, spec: RenderSpec) -> None:
        """Refuse what cannot render, before anything loads."""
        problems = validate_spec(spec)
        if spec.model != self.model_id:
            problems.append(f"model: this adapter renders {self.model_id}, not {spec.model}")
        slots = [c.slot for c in spec.control_images]
        if len(slots) != len(set(slots)):
            problems.append("control_images: a slot is given more than once")
        if self.control_kind == "single" and set(slots) - {"ctrl_img"}:
            problems.append(f"control_images: {self.model_id} takes only `ctrl_img` "
                            f"(got {', '.join(sorted(slots))})")
        if self.control_kind == "multi":
            numbered = [s for s in ("ctrl_img_1", "ctrl_img_2", "ctrl_img_3") if s in slots]
            expected = ["ctrl_img_1", "ctrl_img_2", "ctrl_img_3"][: len(numbered)]
            if numbered and numbered != expected:
                problems.append(f"control_images: slots must be filled in order from ctrl_img_1 "
                                f"(got {', '.join(numbered)})")
        if problems:
            raise PipelineError(f"cannot render {spec.model}: " + "; ".join(problems))
        if spec.lora is not None and not os.path.isfile(spec.lora.path):
            raise LoraError(f"{spec.lora.path}: LoRA file not found")

    # -- LoRA --------------------------------------------------------------------------------

    def _lora_mode(self, spec: RenderSpec) -> str:
        """aitk: as ai-toolkit sampled (merged, or a runtime branch for quantised runs); reference: the
        seeds' per-model choice (fused for 2512/2511, adapters for edit/2509)."""
        if spec.parity == "aitk":
            return "fuse" if spec.aitk.lora_merged else "adapter"
        return "fuse" if self.info.lora_mode == "fuse" else "adapter"

    def _unfuse(self, lora: _LoadedLora) -> None:
        """Unfuse, then read the touched weights back from the model files so no rounding residue
        of the merge survives (it accumulates over checkpoint switches in bf16)."""
        self.pipe.unfuse_lora()
        lora.fused_at = None
        if self._base_weights is False:
            self._base_weights = BaseWeights.find(resolve_source(self.source.path) / "transformer")
            if self._base_weights is None:
                logger.warning("%s: no safetensors transformer files to restore from; unfusing leaves a "
                               "rounding residue", self.source.path)
        if self._base_weights is not None:
            self._base_weights.restore(self.pipe.transformer, lora.modules)

    def _drop_lora(self) -> None:
        if self._lora is None:
            return
        if self._lora.fused_at is not None:
            self._unfuse(self._lora)
        self.pipe.delete_adapters(ADAPTER)
        self._lora = None

    def _install_lora(self, spec: LoraSpec, key: tuple) -> None:
        weights: LoraWeights = load_lora(spec.path, module_names=self._module_names)
        if weights.unmatched:
            logger.warning("%s: %d LoRA module(s) match nothing in %s and are skipped: %s", spec.path,
                           len(weights.unmatched), self.model_id, ", ".join(weights.unmatched[:5]))
        previous = self._lora
        if previous is not None and previous.fused_at is not None:
            self._unfuse(previous)
        method = "load"
        if previous is not None and previous.signature == weights.signature():
            try:
                self.pipe.load_lora_weights(dict(weights.state_dict), adapter_name=ADAPTER, hotswap=True)
                method = "hotswap"
            except (RuntimeError, ValueError) as exc:
                logger.warning("%s: hot-swap failed (%s); unloading and loading instead", spec.path, exc)
        if method == "load":
            self._lora = None
            if previous is not None:
                self.pipe.delete_adapters(ADAPTER)
            try:
                self.pipe.load_lora_weights(dict(weights.state_dict), adapter_name=ADAPTER)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise LoraError(f"{spec.path}: cannot be applied to {self.model_id} ({exc})") from exc
        adapters = self.pipe.get_list_adapters().get("transformer", [])
        if ADAPTER not in adapters:
            self._lora = None
            raise PipelineError(f"{spec.path}: the LoRA did not attach to the transformer")
        self._lora = _LoadedLora(
            key=key, path=spec.path, sha256=spec.sha256, signature=weights.signature(),
            modules=tuple(weights.modules),
            weights_info={"modules": len(weights.modules), "unmatched": list(weights.unmatched),
                          "ranks": sorted(set(weights.ranks.values())), "format": weights.source_format,
                          "alpha_folded": weights.alpha_folded, "swap": method})

    def _set_lora_scale(self, scale: float, mode: str) -> None:
        lora = self._lora
        if mode == "adapter":
            if lora.fused_at is not None:
                self._unfuse(lora)
            if lora.scale != scale:
                self.pipe.set_adapters([ADAPTER], [scale])
                lora.scale = scale
            return
        if lora.fused_at == scale:
            return
        if lora.fused_at is not None:
            self._unfuse(lora)
        # unfuse leaves peft's scaling at the last fuse scale (tiny-models-cpu.md E9): reset it first.
        self.pipe.set_adapters([ADAPTER], [1.0])
        self.pipe.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
        lora.fused_at = scale
        lora.scale = scale

    def apply_lora(self, spec: LoraSpec | None, mode: str = "fuse") -> dict[str, Any] | None:
        """Make the transformer carry exactly `spec` (or no LoRA), fused or as an adapter, and say how."""
        if spec is None:
            self._drop_lora()
            return None
        stat = os.stat(spec.path)
        key = (os.path.realpath(spec.path), stat.st_size, stat.st_mtime_ns, spec.sha256)
        if self._lora is None or self._lora.key != key:
            self._install_lora(spec, key)
        self._set_lora_scale(float(spec.network_multiplier), mode)
        return {"path": spec.path, "sha256": spec.sha256, "network_multiplier": spec.network_multiplier,
                "mode": mode, **self._lora.weights_info}

    # -- prompt embeddings ---------------------------------------------------------------------

    def _cached_embeds(self, key: tuple, compute) -> tuple[torch.Tensor, torch.Tensor]:
        if key in self._embeds:
            self._embeds.move_to_end(key)
            return self._embeds[key]
        embeds, mask = compute()
        if mask is None:
            # ai-toolkit keeps an explicit all-ones mask; the pipelines turn it back into None.
            mask = torch.ones(embeds.shape[:2], dtype=torch.int64, device=embeds.device)
        self._embeds[key] = (embeds, mask)
        while len(self._embeds) > EMBED_CACHE_SIZE:
            self._embeds.popitem(last=False)
        return embeds, mask

    def _encode(self, text: str, spec: RenderSpec, plan: ControlPlan | None,
                images_key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _te_record(self, spec: RenderSpec, plan: ControlPlan | None) -> dict[str, Any]:
        return {}

    # -- rendering -----------------------------------------------------------------------------

    def _scheduler(self, parity: str):
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = AITK_SCHEDULER if parity == "aitk" else self._hub_scheduler_config
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def _denoise(self, spec: RenderSpec, plan: ControlPlan | None, embeds: dict[str, torch.Tensor],
                 width: int, height: int, generator: torch.Generator, callback) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def render(self, spec: RenderSpec, *, on_step: StepCallback | None = None,
               should_stop: StopCheck | None = None) -> RenderResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        self.check(spec)
        images = {c.slot: open_control(c.path) for c in spec.control_images}
        self.load()
        timings["load"] = time.perf_counter() - started

        seed = spec.seed if spec.seed >= 0 else secrets.randbelow(2**32)
        width, height = snap(spec.width, DIVISOR), snap(spec.height, DIVISOR)
        plan = plan_controls(spec, self.control_kind, images) if self.control_kind != "none" else None

        mark = time.perf_counter()
        lora_record = self.apply_lora(spec.lora, self._lora_mode(spec))
        timings["lora"] = time.perf_counter() - mark

        mark = time.perf_counter()
        digests = () if plan is None else tuple(_image_digest(img) for _slot, img in plan.text_encoder)
        do_cfg = spec.guidance_scale > 1
        embeds = {}
        embeds["prompt_embeds"], embeds["prompt_embeds_mask"] = self._encode(spec.prompt, spec, plan, digests)
        if do_cfg:
            embeds["negative_prompt_embeds"], embeds["negative_prompt_embeds_mask"] = self._encode(
                spec.neg, spec, plan, digests)
        timings["encode"] = time.perf_counter() - mark

        self.pipe.scheduler = self._scheduler(spec.parity)
        generator = torch.Generator("cpu").manual_seed(seed)
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

        if should_stop is not None and should_stop():
            raise RenderInterrupted(f"{spec.model}: stopped before denoising")
        tiling = spec.parity == "aitk" and spec.aitk.vae_tiling
        mark = time.perf_counter()
        if tiling:
            self.pipe.vae.enable_tiling()
        try:
            array, call_record = self._denoise(spec, plan, embeds, width, height, generator, callback)
        finally:
            if tiling:
                self.pipe.vae.disable_tiling()
        timings["denoise"] = time.perf_counter() - mark
        if not np.isfinite(array).all():
            raise NonFiniteOutput(f"{spec.model}: the decoded image is not finite")
        image = self.pipe.numpy_to_pil(array)[0]
        timings["total"] = time.perf_counter() - started

        record = {
            "model": spec.model,
            "parity": spec.parity,
            "pipeline": type(self.pipe).__name__,
            "source": self.source.path,
            "device": self.device,
            "dtype": self.dtype,
            "text_encoder_quantization": self.source.quantize_text_encoder,
            "prompt": spec.prompt,
            "neg": spec.neg,
            "seed": seed,
            "generator": "torch.Generator('cpu').manual_seed(seed), one per image",
            "requested_size": [spec.width, spec.height],
            "size": [width, height],
            "size_divisor": DIVISOR,
            "steps": spec.sample_steps,
            "true_cfg_scale": spec.guidance_scale,
            "cfg": do_cfg,
            "scheduler": {"source": "aitk-hardcoded" if spec.parity == "aitk" else "model-folder",
                          "class": type(self.pipe.scheduler).__name__,
                          "config": {k: v for k, v in self.pipe.scheduler.config.items()
                                     if not k.startswith("_")}},
            "vae_tiling": tiling,
            "lora": lora_record,
            **self._te_record(spec, plan),
            **call_record,
            "versions": _versions(),
        }
        return RenderResult(image=image, seed=seed, width=width, height=height, record=record,
                            timings=timings)


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


class QwenImagePreview(_QwenPreview):
    """Qwen-Image and Qwen-Image-2512: text to image."""

    control_kind = "none"

    def _pipeline_class(self):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    def _encode(self, text, spec, plan, images_key):
        key = ("t2i", text)
        return self._cached_embeds(key, lambda: self.pipe.encode_prompt(text, device=self.pipe._execution_device,
                                                                        num_images_per_prompt=1))

    def _denoise(self, spec, plan, embeds, width, height, generator, callback):
        out = self.pipe(**embeds, height=height, width=width, num_inference_steps=spec.sample_steps,
                        true_cfg_scale=spec.guidance_scale, generator=generator, output_type="np",
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
        key = (self.control_kind, spec.parity, self._te_area(), text, images_key)

        def compute():
            tensors = self._te_images(plan, spec)
            image = tensors if self.control_kind == "multi" else tensors[0]
            return self.pipe.encode_prompt(text, image=image, device=self.pipe._execution_device,
                                           num_images_per_prompt=1)

        return self._cached_embeds(key, compute)

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
        from previewd.pipelines.qwen_vae_cache import QwenEditCachedPipeline

        return QwenEditCachedPipeline

    def _denoise(self, spec, plan, embeds, width, height, generator, callback):
        (_slot, img), = plan.vae
        vae_img, kernel = edit_vae_image(img, width, height, spec.parity)
        out = self.pipe(image=vae_img, **embeds, height=height, width=width,
                        num_inference_steps=spec.sample_steps, true_cfg_scale=spec.guidance_scale,
                        generator=generator, output_type="np", callback_on_step_end=callback)
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
        from previewd.pipelines.qwen_edit_plus_loop import QwenEditPlusCfgNormPipeline

        return QwenEditPlusCfgNormPipeline

    def _denoise(self, spec, plan, embeds, width, height, generator, callback):
        vae_images = [img for _slot, img in plan.vae]
        do_cfg = spec.guidance_scale > 1
        common = dict(height=height, width=width, num_inference_steps=spec.sample_steps,
                      true_cfg_scale=spec.guidance_scale, generator=generator)
        if spec.parity == "reference":
            out = self.pipe(image=vae_images, **embeds, **common, output_type="np",
                            callback_on_step_end=callback)
            array, renorm, loop = out.images, do_cfg, "diffusers QwenImageEditPlusPipeline"
        else:
            negatives = {k: embeds.get(k) for k in ("negative_prompt_embeds", "negative_prompt_embeds_mask")}
            array = self.pipe.sample(vae_images, prompt_embeds=embeds["prompt_embeds"],
                                     prompt_embeds_mask=embeds["prompt_embeds_mask"], **negatives, **common,
                                     cfg_norm=spec.aitk.do_cfg_norm, callback_on_step_end=callback)
            renorm, loop = do_cfg and spec.aitk.do_cfg_norm, "previewd aitk edit-plus loop"
        return array, {"cfg_renorm": renorm, "denoise_loop": loop,
                       "vae_images": [{"slot": slot, "source_size": [img.width, img.height],
                                       "resize": "diffusers LANCZOS to ~1 MP"} for slot, img in plan.vae]}
