"""Writes previews: images, manifest.json, grid.png and index.html, all atomically.

Every file goes to a temporary name in the same folder and is `os.replace`d into place, so a
reader never sees half a file and a crash never leaves a corrupt manifest. The manifest is
read-modify-written under a file lock because several workers may share one outbox.
"""

from __future__ import annotations

import contextlib
import fcntl
import html
import io
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from pydantic import ValidationError

from previewd.errors import OutboxError
from previewd.fileio import atomic_write
from previewd.manifest import Manifest, RenderEntry
from previewd.tasks import OutputTarget

MANIFEST = "manifest.json"
GRID = "grid.png"
PAGE = "index.html"
LOCK = ".manifest.lock"
"""Serialises writers of one folder; its presence also marks the folder as previewd's output."""
THUMBS = ".thumbs"
"""Small copies of each render, so the grid is rebuilt from thumbnails rather than full images."""
_GRID_MAX_SIDE = 8192
_CELL = 256
_LABEL_H = 18


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def encode_image(image: Image.Image, fmt: str, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("previewd", json.dumps(record, sort_keys=True))
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=95,
                                  comment=json.dumps(record, sort_keys=True).encode())
    return buffer.getvalue()


def compare(ours: Image.Image, theirs_path: Path) -> dict[str, Any]:
    """How far our render is from ai-toolkit's own sample for the same step and prompt."""
    import numpy as np

    try:
        with Image.open(theirs_path) as theirs:
            theirs_rgb = theirs.convert("RGB")
    except OSError as exc:
        return {"error": f"cannot read sample: {exc}"}
    if theirs_rgb.size != ours.size:
        return {"error": f"size differs: ours {ours.size[0]}x{ours.size[1]}, "
                         f"sample {theirs_rgb.size[0]}x{theirs_rgb.size[1]}"}
    a = np.asarray(ours.convert("RGB"), dtype=np.float64)
    b = np.asarray(theirs_rgb, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return {"mean_abs_diff": round(float(abs(a - b).mean()), 4),
            "max_abs_diff": int(abs(a - b).max()),
            "psnr_db": None if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 3)}


def read_manifest(out_dir: Path) -> Manifest | None:
    """The folder's manifest; a corrupt one is kept aside as manifest.json.corrupt and started afresh
    (every render is in its PNG's metadata, so nothing is lost)."""
    path = out_dir / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError:
        pass
    os.replace(path, out_dir / f"{MANIFEST}.corrupt")
    return None


def _attach_sample(entry: RenderEntry, out_dir: Path, sample: Path, image: Image.Image) -> None:
    entry.aitk_sample = os.path.relpath(sample, out_dir)
    entry.aitk_sample_diff = compare(image, sample)


def _backfill_samples(manifest: Manifest, out_dir: Path, samples: dict[tuple[int, int], Path]) -> None:
    """ai-toolkit often finishes its own sample of a step after we rendered it: pair them later."""
    for entry in manifest.renders:
        sample = samples.get((entry.step, entry.prompt_index))
        if sample is None or entry.aitk_sample:
            continue
        try:
            with Image.open(out_dir / entry.image) as ours:
                _attach_sample(entry, out_dir, sample, ours.convert("RGB"))
        except OSError:
            continue


def write_render(target: OutputTarget, image: Image.Image, entry: RenderEntry, *,
                 aitk_samples: dict[tuple[int, int], Path] | None = None, grid: bool = True,
                 page: bool = True) -> RenderEntry:
    """Write one render and fold it into the manifest, grid and page. Returns the manifest entry.

    `aitk_samples`: the run's own samples by (step, prompt index), to show beside ours.
    """
    out_dir = Path(target.out_dir)
    if out_dir.is_symlink():
        raise OutboxError(f"{out_dir}: the output folder is a symbolic link; previewd does not write through it")
    samples = aitk_samples or {}
    entry = entry.model_copy(update={"image": target.image_name,
                                     "rendered_at": datetime.now(timezone.utc).isoformat()})
    if (sample := samples.get((target.step, target.prompt_index))) is not None:
        _attach_sample(entry, out_dir, sample, image)
    with _locked(out_dir):
        atomic_write(out_dir / target.image_name,
                     encode_image(image, target.format, entry.model_dump(mode="json")))
        if grid:
            atomic_write(out_dir / THUMBS / f"{target.image_name}.png", _thumbnail(image))
        manifest = read_manifest(out_dir) or Manifest()
        manifest.title, manifest.source, manifest.job_dir = target.title, target.source, target.job_dir
        manifest.model, manifest.updated_at = entry.model, entry.rendered_at
        manifest.parity_gaps = list(target.parity_gaps)
        manifest.renders = [r for r in manifest.renders if r.image != target.image_name] + [entry]
        _backfill_samples(manifest, out_dir, samples)
        manifest.summarise()
        atomic_write(out_dir / MANIFEST, manifest.model_dump_json(indent=2).encode())
        if grid:
            atomic_write(out_dir / GRID, render_grid(out_dir, manifest))
        if page:
            atomic_write(out_dir / PAGE, render_page(manifest).encode())
    return entry


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _thumbnail(image: Image.Image) -> bytes:
    thumb = image.convert("RGB")
    thumb.thumbnail((_CELL, _CELL))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return buffer.getvalue()


def render_grid(out_dir: Path, manifest: Manifest) -> bytes:
    """Contact sheet: one row per checkpoint (by step), one column per prompt, labelled."""
    rows = manifest.checkpoints
    cols = manifest.prompts
    by_cell = {(r.row_key, r.prompt_index): r for r in manifest.renders}
    # Cells fit the largest render, capped, so small previews are not lost in white space; long
    # runs get smaller cells so the sheet stays a viewable size.
    cell = min(_CELL, max(max(r.width, r.height) for r in manifest.renders),
               max(32, _GRID_MAX_SIDE // max(len(rows), len(cols))))
    label_w = 150
    sheet = Image.new("RGB", (label_w + cell * len(cols), _LABEL_H + (cell + 4) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for c, prompt in enumerate(cols):
        text = f"#{prompt.index}: {prompt.prompt}"[:40]
        draw.text((label_w + c * cell + 4, 3), text, fill="black", font=font)
    for r, ckpt in enumerate(rows):
        y = _LABEL_H + r * (cell + 4)
        draw.text((4, y + cell // 2 - 6), ckpt.label, fill="black", font=font)
        for c, prompt in enumerate(cols):
            render = by_cell.get((ckpt.checkpoint or "base", prompt.index))
            if render is None:
                continue
            thumb = out_dir / THUMBS / f"{render.image}.png"
            try:
                with Image.open(thumb if thumb.exists() else out_dir / render.image) as tile:
                    tile = tile.convert("RGB")
                    tile.thumbnail((cell, cell))
                    sheet.paste(tile, (label_w + c * cell, y))
            except OSError:
                draw.text((label_w + c * cell + 4, y + 4), "(missing)", fill="red", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


_PAGE_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px;vertical-align:top;background:#fff}
th{font-weight:600;text-align:left;max-width:280px}img{width:256px;height:auto;display:block}
.pair{display:flex;gap:4px}.pair figure{margin:0}figcaption{font-size:11px;color:#666}
.meta{font-size:11px;color:#666}#step{width:320px}.gap{color:#8a5a00;margin:.2em 0}
"""

_PAGE_JS = """
const rows=[...document.querySelectorAll('tbody tr')];
const slider=document.getElementById('step');const out=document.getElementById('stepLabel');
function show(i){rows.forEach((r,j)=>r.style.display=(slider.dataset.all==='1'||j==i)?'':'none');
out.textContent=slider.dataset.all==='1'?'all steps':(rows[i]?rows[i].dataset.label:'');}
if(slider){slider.max=Math.max(rows.length-1,0);slider.value=slider.max;slider.dataset.all='1';
slider.oninput=()=>{slider.dataset.all='0';show(+slider.value)};
document.getElementById('all').onclick=()=>{slider.dataset.all='1';show(+slider.value)};show(+slider.value);}
"""


def render_page(manifest: Manifest) -> str:
    """A single HTML file (inline CSS/JS, images by relative path) to browse the renders."""
    esc = html.escape
    by_cell = {(r.row_key, r.prompt_index): r for r in manifest.renders}
    head = "".join(f"<th>#{p.index}<br>{esc(p.prompt)}</th>" for p in manifest.prompts)
    body = []
    for ckpt in manifest.checkpoints:
        cells = []
        for p in manifest.prompts:
            r = by_cell.get((ckpt.checkpoint or "base", p.index))
            if r is None:
                cells.append("<td></td>")
                continue
            figures = [f"<figure><img src='{esc(r.image)}' loading='lazy'><figcaption>previewd</figcaption></figure>"]
            if r.aitk_sample:
                diff = r.aitk_sample_diff or {}
                note = diff.get("error") or f"mean |Δ| {diff.get('mean_abs_diff')}, PSNR {diff.get('psnr_db')} dB"
                figures.append(f"<figure><img src='{esc(r.aitk_sample)}' loading='lazy'>"
                               f"<figcaption>ai-toolkit sample — {esc(str(note))}</figcaption></figure>")
            meta = (f"seed {r.seed} · {r.width}×{r.height} · {r.sample_steps} steps · "
                    f"cfg {r.guidance_scale} · m {r.network_multiplier} · {r.parity}")
            cells.append(f"<td><div class='pair'>{''.join(figures)}</div><div class='meta'>{esc(meta)}</div></td>")
        body.append(f"<tr data-label='{esc(ckpt.label)}'><th>{esc(ckpt.label)}</th>{''.join(cells)}</tr>")
    title = esc(str(manifest.title or "previews"))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title} — previewd</title>"
            f"<style>{_PAGE_CSS}</style></head><body><h1>{title}</h1>"
            f"<p class='meta'>model {esc(str(manifest.model))} · updated {esc(str(manifest.updated_at))}"
            f" · <a href='{MANIFEST}'>manifest.json</a> · <a href='{GRID}'>grid.png</a></p>"
            + "".join(f"<p class='gap'>&#9888; {esc(gap)}</p>" for gap in manifest.parity_gaps)
            + f"<p><input type='range' id='step' min='0' value='0'> <span id='stepLabel'></span> "
            f"<button id='all'>all steps</button></p>"
            f"<table><thead><tr><th>checkpoint</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<script>{_PAGE_JS}</script></body></html>")
