"""One render's files: the image with its record (previewd's JSON and A1111's `parameters`), its
thumbnail, and its difference from ai-toolkit's own sample."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from previewd.manifest import RenderEntry
from previewd.outbox.files import IMAGE_FORMATS, open_file, open_image
from previewd.safe_files import UnsafeFolder

THUMB_SIDE = 256
RECORD_KEY = "previewd"
"""PNG text key (and JPEG comment) that holds the render's manifest entry."""


def a1111_parameters(entry: RenderEntry) -> str:
    """The render in AUTOMATIC1111's infotext format, which image browsers (A1111's PNG Info,
    Civitai, Infinite Image Browsing...) read: prompt, `Negative prompt:`, then `key: value` pairs."""
    fields = {"Steps": entry.sample_steps, "Sampler": "FlowMatchEuler", "CFG scale": f"{entry.guidance_scale:g}",
              "Seed": entry.seed, "Size": f"{entry.width}x{entry.height}", "Model": entry.base or entry.model}
    if entry.checkpoint is not None:
        name = entry.checkpoint.rsplit(".", 1)[0]
        fields["Lora"] = name
        fields["Lora strength"] = f"{entry.network_multiplier if entry.network_multiplier is not None else 1.0:g}"
        if entry.checkpoint_sha256:
            fields["Lora hashes"] = f'"{name}: {entry.checkpoint_sha256[:12]}"'
    fields["Version"] = f"previewd {entry.versions.get('previewd', '')}".strip()
    lines = [entry.prompt]
    if entry.neg:
        lines.append(f"Negative prompt: {entry.neg}")
    lines.append(", ".join(f"{key}: {_infotext_value(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def _infotext_value(value: Any) -> str:
    # Infotext splits on ", " and ": ": a value that holds either is quoted, as A1111 does.
    text = str(value)
    if text.startswith('"') or not ("," in text or ":" in text):
        return text
    return json.dumps(text)


def encode_image(image: Image.Image, fmt: str, entry: RenderEntry) -> bytes:
    record = json.dumps(entry.model_dump(mode="json"), sort_keys=True)
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(RECORD_KEY, record)
        info.add_itxt("parameters", a1111_parameters(entry))
        # The render thread waits for this: zlib's fastest level halves the time for ~10% more bytes.
        image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=95, comment=record.encode())
    return buffer.getvalue()


def read_record(path: Path) -> RenderEntry | None:
    """The manifest entry an image of ours carries (None: not ours, or unreadable)."""
    try:
        with open_file(path) as handle, Image.open(handle, formats=IMAGE_FORMATS) as image:
            # `info` holds the text chunks written before the pixels; `.text` would decode them all.
            text = image.info.get(RECORD_KEY) or image.info.get("comment")
            if isinstance(text, bytes):
                text = text.decode()
    except (OSError, ValueError, UnicodeDecodeError, UnsafeFolder):
        return None
    if not text:
        return None
    try:
        return RenderEntry.model_validate_json(text)
    except ValueError:
        return None


def thumbnail(image: Image.Image) -> Image.Image:
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return thumb


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    """Thumbnails are only looked at: JPEG encodes an order of magnitude faster than PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def compare(ours: Image.Image, theirs_path: Path) -> tuple[dict[str, Any], Image.Image | None]:
    """How far our render is from ai-toolkit's own sample for the same step and prompt, and the
    sample's thumbnail. The sample lies in the run, beside the output folder: it is read only as a
    regular PNG, JPEG or WebP file within the output roots."""
    import numpy as np

    theirs_rgb = open_image(theirs_path, inside_output=False)
    if theirs_rgb is None:
        return {"error": "cannot read sample (not a regular PNG, JPEG or WebP file of bounded size)"}, None
    thumb = thumbnail(theirs_rgb)
    if theirs_rgb.size != ours.size:
        return {"error": f"size differs: ours {ours.size[0]}x{ours.size[1]}, "
                         f"sample {theirs_rgb.size[0]}x{theirs_rgb.size[1]}"}, thumb
    a = np.asarray(ours.convert("RGB"), dtype=np.float64)
    b = np.asarray(theirs_rgb, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return {"mean_abs_diff": round(float(abs(a - b).mean()), 4),
            "max_abs_diff": int(abs(a - b).max()),
            "psnr_db": None if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 3)}, thumb
