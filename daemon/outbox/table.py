"""The grid as a table: rows and columns from the manifest's layout, and the cell at each place.
grid.png and the page draw the same table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from previewd.manifest import Manifest, PlannedCell, RenderEntry

Status = Literal["done", "pending", "failed"]


@dataclass(frozen=True)
class Header:
    key: object
    label: str
    """Short label (fits a narrow column)."""
    title: str
    """The whole text (a prompt in full, a checkpoint's file name)."""


@dataclass(frozen=True)
class Column:
    keys: tuple
    headers: tuple[Header, ...]
    """One per column axis, outermost first."""


@dataclass(frozen=True)
class Cell:
    status: Status
    cell: RenderEntry | PlannedCell


@dataclass(frozen=True)
class Table:
    row_axis: str
    column_axes: tuple[str, ...]
    rows: tuple[Header, ...]
    columns: tuple[Column, ...]
    cells: dict[tuple[int, int], Cell]


def header(manifest: Manifest, axis: str, key: object) -> Header:
    if axis == "checkpoint":
        ckpt = next((c for c in manifest.checkpoints if c.key == key), None)
        label = ckpt.label if ckpt else str(key)
        return Header(key, label, ckpt.checkpoint or label if ckpt else label)
    if axis == "prompt":
        prompt = next((p.prompt for p in manifest.prompts if p.index == key), "")
        return Header(key, f"#{key}", f"#{key}: {prompt}")
    if key is None:
        return Header(key, "—", f"no {axis} sweep")
    text = f"strength {key:g}" if axis == "strength" else f"seed {key}"
    return Header(key, text, text)


def _values(manifest: Manifest, axis: str) -> list:
    if axis == "checkpoint":
        return [c.key for c in manifest.checkpoints]
    if axis == "prompt":
        return [p.index for p in manifest.prompts]
    return list(manifest.strengths if axis == "strength" else manifest.seeds)


def build(manifest: Manifest) -> Table:
    """The table of a summarised manifest. A rendered cell wins over a failed one, a failed one
    over a pending one (a cell is listed once normally; this covers a manifest two writers merged)."""
    layout = manifest.layout
    rows = [header(manifest, layout.rows, v) for v in _values(manifest, layout.rows)]
    columns: list[tuple] = [()]
    for axis in layout.columns:
        columns = [(*prefix, v) for prefix in columns for v in _values(manifest, axis)]
    cols = [Column(keys, tuple(header(manifest, a, v) for a, v in zip(layout.columns, keys))) for keys in columns]
    row_at = {h.key: i for i, h in enumerate(rows)}
    col_at = {c.keys: i for i, c in enumerate(cols)}
    cells: dict[tuple[int, int], Cell] = {}
    for status, group in (("pending", manifest.pending), ("failed", manifest.failed), ("done", manifest.renders)):
        for c in group:
            r = row_at.get(c.axes.value(layout.rows))
            k = col_at.get(tuple(c.axes.value(a) for a in layout.columns))
            if r is not None and k is not None:
                cells[(r, k)] = Cell(status, c)
    return Table(layout.rows, tuple(layout.columns), tuple(rows), tuple(cols), cells)
