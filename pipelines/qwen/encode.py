"""Which control images go where, and how they are prepared, per parity profile.

The Qwen edit models see their control images twice: through the text encoder (Qwen2.5-VL reads
them with the prompt) and through the VAE (as extra latent tokens). ai-toolkit and the reference
server prepare both paths differently (aitk-sampling.md §B.5, §C.2, §C.4 #3-#5, §E.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from previewd.errors import ControlImageError
from previewd.spec import NUMBERED_CONTROL_SLOTS, RenderSpec

EDIT_TE_AREA = 1024 * 1024
"""ai-toolkit runs the edit model's text-encoder image at about 1 MP (qwen_image_edit.py)."""


@dataclass(frozen=True)
class ControlPlan:
    """Control images of one render: (slot, image) pairs for each path, in order."""

    text_encoder: tuple[tuple[str, Image.Image], ...]
    vae: tuple[tuple[str, Image.Image], ...]


def open_control(path: str) -> Image.Image:
    """Open as ai-toolkit and the reference server do: RGB, no EXIF transpose."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ControlImageError(f"{path}: cannot read control image ({exc})") from exc


def plan_controls(spec: RenderSpec, kind: str, images: dict[str, Image.Image]) -> ControlPlan:
    """Decide which opened images (by slot) feed the text encoder and the VAE.

    kind "single" (edit): `ctrl_img` for both. kind "multi" (edit-plus):
    - aitk: `SampleItem.ctrl_img_1` defaults to `ctrl_img`, and the text encoder gets
      [ctrl_img?, ctrl_img_1?, _2?, _3?], so a lone `ctrl_img` is encoded twice; the VAE gets
      [ctrl_img or ctrl_img_1, _2?, _3?];
    - reference: [ctrl_img_1, _2, _3] when any is set, else [ctrl_img], for both paths.
    """
    if kind == "single":
        pair = (("ctrl_img", images["ctrl_img"]),)
        return ControlPlan(text_encoder=pair, vae=pair)
    numbered = [(s, images[s]) for s in NUMBERED_CONTROL_SLOTS if s in images]
    if spec.parity == "reference":
        chosen = tuple(numbered) if numbered else (("ctrl_img", images["ctrl_img"]),)
        return ControlPlan(text_encoder=chosen, vae=chosen)
    first = images.get("ctrl_img")
    slot1 = ("ctrl_img_1", images["ctrl_img_1"]) if "ctrl_img_1" in images else (
        ("ctrl_img_1", first) if first is not None else None)
    te = ([("ctrl_img", first)] if first is not None else []) + ([slot1] if slot1 else [])
    te += [pair for pair in numbered if pair[0] != "ctrl_img_1"]
    vae_first = ("ctrl_img", first) if first is not None else slot1
    vae = [vae_first] + [pair for pair in numbered if pair[0] != "ctrl_img_1"]
    return ControlPlan(text_encoder=tuple(te), vae=tuple(vae))


def to_unit_tensor(img: Image.Image, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1], the same values torchvision's `to_tensor` gives."""
    array = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    chw = array.permute(2, 0, 1).contiguous()
    return chw.to(dtype=torch.float32).div(255).unsqueeze(0).to(device, dtype=dtype)


def text_encoder_size(width: int, height: int, area: int, parity: str) -> tuple[int, int]:
    """(H, W) the control tensor is interpolated to before the text encoder.

    Both projects compute sqrt(area * H / W) and divide it by H/W, rounding each to 32. ai-toolkit
    uses the first as the height; the reference server uses it as the width (its H/W swap).
    """
    ratio = height / width
    first = math.sqrt(area * ratio)
    second = first / ratio
    first, second = round(first / 32) * 32, round(second / 32) * 32
    return (first, second) if parity == "aitk" else (second, first)


def text_encoder_tensor(img: Image.Image, area: int, parity: str, device: str,
                        dtype: torch.dtype) -> torch.Tensor:
    """Control image as the text encoder receives it: bilinear `F.interpolate` of the [0, 1] tensor."""
    size = text_encoder_size(img.width, img.height, area, parity)
    return F.interpolate(to_unit_tensor(img, device, dtype), size=size, mode="bilinear")


def edit_vae_image(img: Image.Image, width: int, height: int, parity: str) -> tuple[Image.Image, str]:
    """The edit model's pipeline image: resized to the output size first.

    ai-toolkit resizes with BILINEAR and only when the size differs; the reference server always
    resizes with LANCZOS (PIL returns an equal copy when nothing changes).
    """
    if parity == "aitk":
        if img.size == (width, height):
            return img, "none"
        return img.resize((width, height), Image.BILINEAR), "bilinear"
    return img.resize((width, height), Image.LANCZOS), "lanczos"
