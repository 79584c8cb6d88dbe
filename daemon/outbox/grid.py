"""grid.png: the contact sheet of a folder, labelled with a scalable font, painted incrementally.

The painter keeps the sheet of its last write. While the geometry (tile size, rows, columns,
labels) stays the same, a write pastes only the tiles that changed; when rows or columns are added,
a new frame is drawn and the tiles already painted are copied across from the old sheet, so the
thumbnails on disk are read once per process, not once per render.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

from previewd.manifest import Manifest, RenderEntry
from previewd.outbox.images import THUMB_SIDE, png_bytes
from previewd.outbox.table import Cell, Table

GRID_MAX_SIDE = 8192
"""Long runs get smaller tiles so the sheet stays a viewable size."""
MIN_TILE = 32
GAP = 4
PAD = 4
MAX_HEADER_LINES = 4
"""A prompt that needs more lines in its column is labelled `#i` and written out in the legend."""
LEGEND_MIN_WIDTH = 480
_FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
          "/usr/share/fonts/dejavu/DejaVuSans.ttf")
_PENDING_FILL, _FAILED_FILL = (236, 236, 236), (252, 228, 228)

TileKey = tuple[int, int, int]
"""(row, column, slot): slot 0 is ours, slot 1 ai-toolkit's sample."""
Thumbs = Callable[[RenderEntry, int], "Image.Image | None"]


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans where the system has it (wide Unicode coverage for prompts), else Pillow's own
    scalable font."""
    for path in _FONTS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def wrap(text: str, fnt, width: float) -> list[str]:
    """`text` in lines no wider than `width`; words wider than a line are broken."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if fnt.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and fnt.getlength(word) > width:
            cut = max(1, max((n for n in range(1, len(word)) if fnt.getlength(word[:n]) <= width), default=1))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines or [""]


def _clip(lines: list[str], count: int, fnt, width: float) -> list[str]:
    """At most `count` lines; the last one ends in an ellipsis when some were left out."""
    if len(lines) <= count:
        return lines
    last = lines[count - 1]
    while last and fnt.getlength(last + "…") > width:
        last = last[:-1]
    return [*lines[:count - 1], last + "…"]


@dataclass(frozen=True)
class Geometry:
    """Everything that decides the sheet's pixels except the tiles; equal geometry, same frame."""

    size: tuple[int, int]
    tile: int
    slots: int
    font_size: int
    texts: tuple[tuple[int, int, str, str], ...]
    """(x, y, text, colour) of every label."""
    tiles: dict[TileKey, tuple[int, int]] = field(hash=False, compare=False)
    positions: tuple = ()
    """`tiles` as a tuple, for comparison."""


def _tile_side(table: Table, manifest: Manifest, slots: int) -> int:
    largest = max((max(c.cell.width, c.cell.height) for c in table.cells.values()), default=THUMB_SIDE)
    by_count = GRID_MAX_SIDE // max(len(table.rows), len(table.columns) * slots, 1)
    return max(MIN_TILE, min(THUMB_SIDE, largest, by_count))


def plan(table: Table, manifest: Manifest, *, aitk_column: bool) -> Geometry:
    slots = 2 if aitk_column and any(r.aitk_sample for r in manifest.renders) else 1
    tile = _tile_side(table, manifest, slots)
    size = 14 if tile >= 128 else 12 if tile >= 64 else 10
    fnt = font(size)
    line_h = size + 3
    col_w = slots * tile + (slots - 1) * 2
    texts: list[tuple[int, int, str, str]] = []

    title = f"{manifest.title or 'previews'} — {manifest.model or ''}".rstrip(" —")
    y = PAD
    title_y = y
    y += line_h + PAD

    row_labels = [wrap(h.label, fnt, 10**6)[0] for h in table.rows]
    label_w = math.ceil(min(240, max((fnt.getlength(t) for t in row_labels), default=40) + 2 * PAD + 1))
    legend: list[str] = []
    bands: list[list[tuple[int, int, list[str]]]] = []
    for depth, axis in enumerate(table.column_axes):
        spans: list[tuple[int, int, list[str]]] = []
        start = 0
        for c in range(1, len(table.columns) + 1):
            if c < len(table.columns) and table.columns[c].keys[:depth + 1] == table.columns[start].keys[:depth + 1]:
                continue
            head = table.columns[start].headers[depth]
            width = (c - start) * (col_w + GAP) - GAP
            lines = wrap(head.title if axis == "prompt" else head.label, fnt, width)
            if len(lines) > MAX_HEADER_LINES:
                legend.append(head.title)
                lines = wrap(head.label, fnt, width)
            spans.append((start, c, _clip(lines, MAX_HEADER_LINES, fnt, width)))
            start = c
        bands.append(spans)
    for spans in bands:
        band_h = max(len(lines) for _s, _e, lines in spans) * line_h + PAD
        for start, _end, lines in spans:
            x = label_w + start * (col_w + GAP)
            texts += [(x, y + i * line_h, line, "black") for i, line in enumerate(lines)]
        y += band_h
    if slots == 2:
        for c in range(len(table.columns)):
            x = label_w + c * (col_w + GAP)
            for slot, name in enumerate(("previewd", "ai-toolkit")):
                texts.append((x + slot * (tile + 2), y, _clip(wrap(name, fnt, tile), 1, fnt, tile)[0], "#555"))
        y += line_h
    header_h = y + GAP

    row_lines = max(1, tile // line_h)
    tiles: dict[TileKey, tuple[int, int]] = {}
    for r, h in enumerate(table.rows):
        ty = header_h + r * (tile + GAP)
        lines = _clip(wrap(h.label, fnt, label_w - 2 * PAD), row_lines, fnt, label_w - 2 * PAD)
        top = ty + (tile - len(lines) * line_h) // 2
        texts += [(PAD, top + i * line_h, line, "black") for i, line in enumerate(lines)]
        for c in range(len(table.columns)):
            for slot in range(slots):
                tiles[(r, c, slot)] = (label_w + c * (col_w + GAP) + slot * (tile + 2), ty)
    width = label_w + len(table.columns) * (col_w + GAP)
    height = header_h + len(table.rows) * (tile + GAP)
    if legend:
        width = max(width, LEGEND_MIN_WIDTH)
        y = height + PAD
        for text in legend:
            for line in wrap(text, fnt, width - 2 * PAD):
                texts.append((PAD, y, line, "black"))
                y += line_h
        height = y + PAD
    texts.insert(0, (PAD, title_y, _clip(wrap(title, fnt, width - 2 * PAD), 1, fnt, width - 2 * PAD)[0], "#333"))
    return Geometry((width, height), tile, slots, size, tuple(texts), tiles, tuple(sorted(tiles.items())))


def _frame(geo: Geometry) -> Image.Image:
    sheet = Image.new("RGB", geo.size, "white")
    draw = ImageDraw.Draw(sheet)
    fnt = font(geo.font_size)
    for x, y, text, colour in geo.texts:
        draw.text((x, y), text, fill=colour, font=fnt)
    return sheet


def _stamp(cell: Cell | None, slot: int) -> str | None:
    if cell is None:
        return None
    if cell.status != "done":
        return f"{cell.status}:{cell.cell.error or ''}" if cell.status == "failed" else "pending"
    entry = cell.cell
    return f"{entry.image}@{entry.rendered_at}" if slot == 0 else entry.aitk_sample


class GridPainter:
    def __init__(self) -> None:
        self._geometry: Geometry | None = None
        self._sheet: Image.Image | None = None
        self._stamps: dict[TileKey, str | None] = {}
        self._ids: dict[TileKey, tuple] = {}

    def paint(self, table: Table, manifest: Manifest, thumbs: Thumbs, *, aitk_column: bool) -> bytes:
        geo = plan(table, manifest, aitk_column=aitk_column)
        if geo != self._geometry:
            self._reframe(geo, table)
        sheet = self._sheet
        draw = ImageDraw.Draw(sheet)
        for key, (x, y) in geo.tiles.items():
            cell = table.cells.get(key[:2])
            stamp = _stamp(cell, key[2])
            if self._stamps.get(key) == stamp:
                continue
            draw.rectangle((x, y, x + geo.tile - 1, y + geo.tile - 1), fill="white")
            if cell is not None and cell.status != "done":
                self._placeholder(draw, geo, x, y, cell)
            elif stamp is not None and (image := thumbs(cell.cell, key[2])) is not None:
                tile = image.copy()
                tile.thumbnail((geo.tile, geo.tile))
                sheet.paste(tile, (x + (geo.tile - tile.width) // 2, y + (geo.tile - tile.height) // 2))
            elif stamp is not None:
                draw.text((x + 2, y + 2), "(missing)", fill="red", font=font(geo.font_size))
            self._stamps[key] = stamp
        return png_bytes(sheet)

    def _reframe(self, geo: Geometry, table: Table) -> None:
        """A new frame; tiles painted on the old sheet at the same tile size are copied across."""
        sheet = _frame(geo)
        stamps: dict[TileKey, str | None] = {}
        old, old_sheet = self._geometry, self._sheet
        if old is not None and old_sheet is not None and old.tile == geo.tile and old.slots == geo.slots:
            where = {ident: key for key, ident in self._ids.items()}
            for key, ident in _tile_ids(table, geo).items():
                source = where.get(ident)
                if source is None or source not in self._stamps:
                    continue
                x, y = old.tiles[source]
                box = old_sheet.crop((x, y, x + geo.tile, y + geo.tile))
                sheet.paste(box, geo.tiles[key])
                stamps[key] = self._stamps[source]
        self._geometry, self._sheet, self._stamps = geo, sheet, stamps
        self._ids = _tile_ids(table, geo)

    @staticmethod
    def _placeholder(draw: ImageDraw.ImageDraw, geo: Geometry, x: int, y: int, cell: Cell) -> None:
        failed = cell.status == "failed"
        draw.rectangle((x, y, x + geo.tile - 1, y + geo.tile - 1), fill=_FAILED_FILL if failed else _PENDING_FILL)
        fnt = font(geo.font_size)
        line_h = geo.font_size + 3
        text = f"failed: {cell.cell.error}" if failed else "queued"
        lines = _clip(wrap(text, fnt, geo.tile - 4), max(1, (geo.tile - 4) // line_h), fnt, geo.tile - 4)
        for i, line in enumerate(lines):
            draw.text((x + 2, y + 2 + i * line_h), line, fill="#b00" if failed else "#888", font=fnt)


def _tile_ids(table: Table, geo: Geometry) -> dict[TileKey, tuple]:
    """Each tile's place by its axis values, which survive a change of row or column numbers."""
    return {key: (table.rows[key[0]].key, table.columns[key[1]].keys, key[2]) for key in geo.tiles}
