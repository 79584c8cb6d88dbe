"""index.html and manifest.js: a static page that reads the folder's table from manifest.js.

The page is the same file for every folder (package data, written once); manifest.js holds the
table as one `previewdManifest({...})` call, which the page loads, and polls, through a script
tag: browsers refuse fetch() of a local file, not a script, so the page stays live from file://.
"""

from __future__ import annotations

import json
import time
from importlib import resources

from previewd.manifest import Manifest, PlannedCell, RenderEntry
from previewd.outbox.table import Cell, Header, Table

PAGE = "index.html"
DATA = "manifest.js"
THUMBS = ".thumbs"
"""Small copies of each render (and of ai-toolkit's sample beside it), for the grid and the page."""


def page_html() -> bytes:
    return resources.files("previewd.outbox").joinpath("page.html").read_bytes()


def thumb_name(image: str, *, aitk: bool = False) -> str:
    return f"{THUMBS}/{image}.aitk.jpg" if aitk else f"{THUMBS}/{image}.jpg"


def _meta(c: RenderEntry | PlannedCell) -> str:
    parts = [f"seed {c.seed}", f"{c.width}×{c.height}"]
    if isinstance(c, RenderEntry):
        parts += [f"{c.sample_steps} steps", f"cfg {c.guidance_scale:g}"]
    if c.network_multiplier is not None:
        parts.append(f"strength {c.network_multiplier:g}")
    if isinstance(c, RenderEntry):
        parts.append(c.parity)
    return " · ".join(parts)


def _cell(cell: Cell) -> dict:
    c = cell.cell
    if isinstance(c, PlannedCell):
        return {"s": cell.status, "meta": _meta(c), "error": c.error}
    out = {"s": "done", "image": c.image, "thumb": thumb_name(c.image), "w": c.width, "h": c.height,
           "meta": _meta(c)}
    if c.aitk_sample:
        diff = c.aitk_sample_diff or {}
        out |= {"aitk": c.aitk_sample, "aitk_thumb": thumb_name(c.image, aitk=True),
                "note": diff.get("error") or f"ai-toolkit: mean |Δ| {diff.get('mean_abs_diff')}, "
                                             f"PSNR {diff.get('psnr_db')} dB"}
    return out


def _header(h: Header) -> dict:
    return {"label": h.label, "title": h.title}


def page_data(manifest: Manifest, table: Table) -> dict:
    return {"stamp": time.time_ns(), "title": manifest.title, "model": manifest.model,
            "updated_at": manifest.updated_at, "parity_gaps": manifest.parity_gaps,
            "counts": {"done": len(manifest.renders), "pending": len(manifest.pending),
                       "failed": len(manifest.failed)},
            "rows": {"axis": table.row_axis, "values": [_header(h) for h in table.rows]},
            "columns": {"axes": list(table.column_axes),
                        "values": [[_header(h) for h in col.headers] for col in table.columns]},
            "cells": [[r, c, _cell(cell)] for (r, c), cell in sorted(table.cells.items())]}


def manifest_js(manifest: Manifest, table: Table) -> bytes:
    # "</" escaped: a prompt holding "</script>" must not end a script when the data is inlined.
    text = json.dumps(page_data(manifest, table), ensure_ascii=False).replace("</", "<\\/")
    return f"previewdManifest({text});\n".encode()
