"""The plain-data contract between intake, queue, worker and pipelines.

A `RenderSpec` says everything that changes the pixels of one image; nothing in it refers to
the queue or to output placement. Files it names are local and already confined/snapshotted by
intake: pipelines only open them. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

ModelId = Literal[
    "qwen_image",
    "qwen_image_2512",
    "qwen_image_edit",
    "qwen_image_edit_plus",
    "qwen_image_edit_plus_2511",
    "flux2",
]
MODEL_IDS: tuple[str, ...] = ModelId.__args__  # type: ignore[attr-defined]

Parity = Literal["aitk", "reference"]
ControlSlot = Literal["ctrl_img", "ctrl_img_1", "ctrl_img_2", "ctrl_img_3"]
CONTROL_SLOTS: tuple[str, ...] = ControlSlot.__args__  # type: ignore[attr-defined]
NUMBERED_CONTROL_SLOTS = CONTROL_SLOTS[1:]
"""Edit-plus slots, filled in this order; `ctrl_img` is the single-image (and legacy) slot."""

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0
DEFAULT_SEED = 42

# One set of limits for every input path (requests, ai-toolkit runs, queued jobs): a value outside
# them can never render, so intake refuses it where the user sees it.
MIN_SIDE = 64
"""Smallest side after flooring to the model's divisor."""
MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0
MAX_MULTIPLIER = 4.0
"""|network_multiplier| beyond this only produces noise."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraSpec(_Frozen):
    path: str
    """Local safetensors file (for queued jobs: previewd's own snapshot of the checkpoint)."""
    network_multiplier: float = Field(1.0, ge=-MAX_MULTIPLIER, le=MAX_MULTIPLIER)
    sha256: str | None = None
    """Content hash of the file; identifies the checkpoint in records and idempotency keys."""


class ControlImage(_Frozen):
    slot: ControlSlot
    path: str
    """Local image file (URLs and base64 are materialised into state_dir by intake)."""
    sha256: str | None = None


QType = Literal["qfloat8", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7", "uint8"]
"""The quantisations previewd reproduces (aitk-quantized.md): optimum-quanto's qfloat8, and ai-toolkit's
torchao-compatible uintN (uint8 quantises nothing, as in ai-toolkit)."""


class AitkOptions(_Frozen):
    """ai-toolkit sample settings that change pixels (aitk-sampling.md §C, aitk-quantized.md)."""

    do_cfg_norm: bool = False
    """Edit-plus CFG renormalisation (`sample.do_cfg_norm`); stock diffusers always renormalises."""
    vae_tiling: bool = False
    """ai-toolkit tiles the Qwen VAE when the job had `model.low_vram`."""
    lora_merged: bool = True
    """ai-toolkit merges the LoRA into the weights (fp32, then cast) unless the run was quantised or
    layer-offloaded or its samples mix multipliers; then it applies it as a runtime branch."""
    quantize: bool = False
    """Quantise the transformer to `qtype`, as the run did (`model.quantize`); the LoRA then runs as a
    branch, never merged."""
    qtype: QType = "qfloat8"
    """The transformer's quantisation: ai-toolkit's `model.qtype` without its `|<adapter>` part."""
    ara: str | None = None
    """The accuracy recovery adapter after the `|` of `model.qtype` (with `quantize`): a local
    safetensors file, or a hub path `user/repo/file.safetensors` found in the local Hugging Face cache."""
    quantize_te: bool | None = None
    """Quantise the text encoder to `qtype_te` (`model.quantize_te`); None: as the configured
    `models.<id>.quantize_text_encoder` says."""
    qtype_te: QType = "qfloat8"
    """The text encoder's quantisation. FLUX.2 runs quantise theirs with `qtype`, which intake puts here."""

    _QUANTISATION: ClassVar[tuple[str, ...]] = ("quantize", "qtype", "ara", "quantize_te", "qtype_te")

    @model_serializer(mode="wrap")
    def _leave_out_unset_quantisation(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Keeps the job keys (RenderSpec.identity) of renders without quantisation what they were
        # before these fields existed.
        data = handler(self)
        for name in self._QUANTISATION:
            if getattr(self, name) == type(self).model_fields[name].default:
                data.pop(name, None)
        return data


class RenderSpec(_Frozen):
    model: ModelId
    parity: Parity = "aitk"
    prompt: str
    """Final prompt text: trigger word injected and ai-toolkit `--flags` already parsed out."""
    neg: str = ""
    width: int = Field(1024, ge=16, le=MAX_SIDE)
    """Requested size; pipelines floor it to the model's divisor and report the effective size."""
    height: int = Field(1024, ge=16, le=MAX_SIDE)
    seed: int = Field(DEFAULT_SEED, ge=-1)
    """-1 draws a random seed; the seed actually used is in the result."""
    sample_steps: int = Field(DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(DEFAULT_GUIDANCE, ge=0, le=MAX_GUIDANCE)
    lora: LoraSpec | None = None
    control_images: tuple[ControlImage, ...] = ()
    aitk: AitkOptions = AitkOptions()
    base: str | None = None
    """The run's own name_or_path when it resolves locally — a folder or a hub id in the local HF
    cache; None: the configured models.<id>.path."""

    def control(self, slot: str) -> ControlImage | None:
        return next((c for c in self.control_images if c.slot == slot), None)

    def identity(self) -> dict[str, Any]:
        """What determines the pixels, with files named by content, not by path."""
        data = self.model_dump(mode="json")
        if data["base"] is None:  # keys of jobs queued before the field existed stay the same
            del data["base"]
        if self.lora is not None:
            data["lora"] = {"sha256": self.lora.sha256 or self.lora.path,
                            "network_multiplier": self.lora.network_multiplier}
        data["control_images"] = [{"slot": c.slot, "sha256": c.sha256 or c.path}
                                  for c in self.control_images]
        return data


def canonical_hash(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ModelSource(_Frozen):
    """Where a model's weights come from (config `models.<id>`)."""

    path: str
    """A diffusers-layout folder or a hub id (resolved through the user's HF cache, offline-safe)."""
    text_encoder: str | None = None
    """Optional separate source of the text encoder (+ tokenizer/processor)."""
    quantize_text_encoder: Literal["none", "qfloat8"] = "none"


@dataclass
class RenderResult:
    """One rendered image and the record of how it was made."""

    image: Any
    """PIL.Image.Image, RGB."""
    seed: int
    width: int
    height: int
    record: dict[str, Any] = field(default_factory=dict)
    """Every setting that changed pixels (profile, scheduler, resize kernels, LoRA mode, dtype...)."""
    timings: dict[str, float] = field(default_factory=dict)
