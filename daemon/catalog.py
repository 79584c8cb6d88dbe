"""What each model id is and what a render may ask of it; torch-free, so config, intake and the
queue can validate without importing the pipelines.

The limits every input path shares (requests, ai-toolkit runs, the queued spec) are in
`previewd.spec`, beside the fields they bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from previewd.spec import MIN_SIDE, MODEL_IDS, RenderSpec


@dataclass(frozen=True)
class ModelInfo:
    id: str
    hub_id: str
    family: Literal["qwen", "flux2"]
    control: Literal["none", "single", "multi"]
    """none: text-to-image; single: `ctrl_img` required; multi: `ctrl_img_1` required, `_2`/`_3` optional."""
    lora_mode: Literal["fuse", "adapter", "merge"]
    """How the reference server applies the LoRA (seeds); ai-toolkit merges for all of them."""
    divisor: int = 32


MODELS: dict[str, ModelInfo] = {
    m.id: m
    for m in (
        ModelInfo("qwen_image", "Qwen/Qwen-Image", "qwen", "none", "adapter"),
        ModelInfo("qwen_image_2512", "Qwen/Qwen-Image-2512", "qwen", "none", "fuse"),
        ModelInfo("qwen_image_edit", "Qwen/Qwen-Image-Edit", "qwen", "single", "adapter"),
        ModelInfo("qwen_image_edit_plus", "Qwen/Qwen-Image-Edit-2509", "qwen", "multi", "adapter"),
        ModelInfo("qwen_image_edit_plus_2511", "Qwen/Qwen-Image-Edit-2511", "qwen", "multi", "fuse"),
        # ai-toolkit floors FLUX.2 sizes to 16 (flux2_model.py:88), and the reference server's FLUX.2
        # path runs ai-toolkit's own sampler: 16 in both profiles.
        ModelInfo("flux2", "black-forest-labs/FLUX.2-dev", "flux2", "none", "merge", divisor=16),
    )
}
assert set(MODELS) == set(MODEL_IDS)


MAX_SEED = 2**64 - 1
"""torch.manual_seed takes -2**63 to 2**64 - 1; intake's seeds are -1 (random) or non-negative."""


def snap(value: int, divisor: int) -> int:
    """Floor to the divisor, as both ai-toolkit and the reference server do (Qwen 32, FLUX.2 16)."""
    return (int(value) // divisor) * divisor


def validate_spec(spec: RenderSpec) -> list[str]:
    """Problems that make `spec` unrenderable, as "field: message" lines, before any model loads."""
    info = MODELS.get(spec.model)
    if info is None:
        return [f"model: unknown model id {spec.model!r} (known: {', '.join(MODELS)})"]
    problems = []
    if spec.seed > MAX_SEED:
        problems.append(f"seed: {spec.seed} is beyond what torch.manual_seed accepts (at most 2**64 - 1)")
    if info.family == "qwen" and spec.sample_steps < 2:
        problems.append(f"sample_steps: {spec.sample_steps} cannot render on {spec.model} (a 1-step schedule ends "
                        f"on a NaN sigma); use 2 or more")
    for name in ("width", "height"):
        value = getattr(spec, name)
        if snap(value, info.divisor) < MIN_SIDE:
            problems.append(f"{name}: {value} is below the minimum of {MIN_SIDE} px for {spec.model}")
    slots = {c.slot for c in spec.control_images}
    if info.control == "none" and slots and spec.model != "flux2":
        problems.append(f"ctrl_img: {spec.model} takes no control image (got {', '.join(sorted(slots))})")
    if info.control == "single" and "ctrl_img" not in slots:
        problems.append(f"ctrl_img: {spec.model} requires a control image in `ctrl_img`")
    if info.control == "multi" and not ({"ctrl_img_1", "ctrl_img"} & slots):
        problems.append(f"ctrl_img_1: {spec.model} requires at least one control image (`ctrl_img_1`)")
    return problems
