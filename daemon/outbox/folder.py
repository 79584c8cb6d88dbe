"""One output folder's manifest, grid and page, folded together from a batch of changes.

A `Folder` keeps the folder's manifest in memory between writes. Several processes may write one
folder (workers sharing a run), so every fold runs under the folder's file lock and first checks
that manifest.json is still the file it wrote last; if another writer replaced it, the manifest is
read again and the batch is merged into it. The first read in a process also takes in any image of
ours that the manifest lacks (a crash between writing an image and folding it), from the record
the image carries. Files are written and read through files.py: no link followed, no FIFO waited
on, and a folder swapped for another one is read afresh.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from PIL import Image
from pydantic import ValidationError

from previewd.aitk_samples import find_samples
from previewd.errors import OutboxError
from previewd.manifest import MANIFEST_VERSION, Manifest, PlannedCell, RenderEntry
from previewd.outbox import grid as grids, page as pages, table as tables
from previewd.outbox.files import atomic_write, locked, open_image, read_bytes
from previewd.safe_files import output_roots
from previewd.outbox.images import compare, jpeg_bytes, read_record, thumbnail
from previewd.tasks import OutputTarget

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
GRID = "grid.png"
LOCK = ".manifest.lock"
"""Serialises writers of one folder; its presence also marks the folder as previewd's output."""
_IMAGE_SUFFIXES = (".png", ".jpg")
GRID_SHARE = 0.1
"""grid.png is painted again once this share of the time since its last painting has passed, at
the latest on a flush: a long run's sheet takes seconds to encode, and the page is what is watched."""


def read_manifest(out_dir: Path) -> Manifest | None:
    """The folder's manifest; a corrupt one is kept aside as manifest.json.corrupt and started afresh
    (every render is in its image's metadata, and taken in again from there)."""
    path = out_dir / MANIFEST
    try:
        return Manifest.model_validate_json(read_bytes(path))
    except FileNotFoundError:
        return None
    except (ValidationError, OutboxError):  # also a link or a FIFO planted in its place
        pass
    os.replace(path, out_dir / f"{MANIFEST}.corrupt")
    return None


@dataclass
class Options:
    grid: bool = True
    page: bool = True
    aitk_column: bool = True

    @classmethod
    def of(cls, output) -> "Options":
        """From the config's `output:` section."""
        return cls(grid=output.grid, page=output.html, aitk_column=output.grid_aitk)


@dataclass
class RenderOp:
    target: OutputTarget
    entry: RenderEntry
    """With its image name and time set; the image is on disk already."""
    image: Image.Image


@dataclass
class CellOp:
    target: OutputTarget
    cell: PlannedCell
    failed: bool


Op = RenderOp | CellOp


def relative(path: str | None, out_dir: Path) -> str | None:
    """`path` relative to the folder when it is an absolute path (the manifest moves with its folder)."""
    if path is None or not os.path.isabs(path):
        return path
    return os.path.relpath(path, out_dir)


def _relative_record(value, out_dir: Path):
    # The pipeline's record names files (e.g. the LoRA snapshot in state_dir) by absolute path.
    if isinstance(value, dict):
        return {k: (relative(v, out_dir) if isinstance(v, str) and (k == "path" or k.endswith("_path"))
                    else _relative_record(v, out_dir)) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_record(v, out_dir) for v in value]
    return value


def portable(entry: RenderEntry, out_dir: Path) -> RenderEntry:
    """The entry with every path relative to the folder."""
    return entry.model_copy(update={"source": relative(entry.source, out_dir),
                                    "base": relative(entry.base, out_dir),
                                    "record": _relative_record(entry.record, out_dir)})


@dataclass
class Folder:
    path: Path
    options: Options = field(default_factory=Options)
    _renders: dict[str, RenderEntry] = field(default_factory=dict)
    _json: dict[str, str] = field(default_factory=dict)
    """Each render's serialised entry, so a write serialises only what changed."""
    _pending: dict[str, PlannedCell] = field(default_factory=dict)
    _failed: dict[str, PlannedCell] = field(default_factory=dict)
    _head: Manifest = field(default_factory=Manifest)
    _signature: tuple | None = None
    _recovered: bool = False
    _page_written: bool = False
    _painter: grids.GridPainter = field(default_factory=grids.GridPainter)
    _job_dir: Path | None = None
    _images: dict[str, Image.Image] = field(default_factory=dict)
    """This batch's full-size renders, to compare with ai-toolkit's samples without reading them back."""
    _identity: tuple[int, int] | None = None
    """The folder's (device, inode) when last folded: another folder at its path is read afresh."""
    _grid_at: float = float("-inf")
    _grid_cost: float = 0.0
    grid_stale: bool = True
    """grid.png lags behind the manifest (painted less often; one this process has not painted may)."""

    def fold(self, ops: list[Op], *, final: bool = False) -> None:
        """Take `ops` into the folder's files; `final`: grid.png too, however recently it was painted."""
        if not self.path.is_dir():  # removed since: nothing to keep up to date
            self.grid_stale = False
            return
        with locked(self.path):
            changed = self._sync()
            thumbs: dict[tuple[str, int], Image.Image] = {}
            for op in ops:
                changed |= self._describe(op.target)
                if isinstance(op, RenderOp):
                    self._add_render(op, thumbs)
                    changed = True
                else:
                    changed |= self._add_cell(op)
            changed |= self._backfill(thumbs)
            # Rescans record the same queued cells again and again: no change, no write.
            if changed or (self.grid_stale and (final or self.grid_due() <= time.monotonic())):
                self._write(self._manifest(), thumbs, final=final)

    def grid_due(self) -> float:
        """When grid.png may be painted again (time.monotonic())."""
        return self._grid_at + self._grid_cost / GRID_SHARE

    # -- state --------------------------------------------------------------------------------
    def _sync(self) -> bool:
        """Read manifest.json again unless it is the one this process wrote last; True when that
        took in images the manifest lacked."""
        identity = _identity(self.path)
        if identity != self._identity:
            if self._identity is not None:
                log.warning("%s: the output folder was replaced; reading it afresh", self.path)
                self._signature, self._recovered = None, False
            self._identity = identity
        signature = _signature(self.path / MANIFEST)
        if signature is not None and signature == self._signature:
            return False
        read = read_manifest(self.path)
        manifest = read or Manifest()
        if manifest.version < MANIFEST_VERSION:  # version 1 named files by absolute path
            manifest.renders = [portable(r, self.path) for r in manifest.renders]
        self._renders = {r.image: r for r in manifest.renders}
        self._pending = {c.image: c for c in manifest.pending}
        self._failed = {c.image: c for c in manifest.failed}
        self._json.clear()
        self._head = manifest.model_copy(update={"renders": [], "pending": [], "failed": []})
        if manifest.job_dir is not None and self._job_dir is None:
            job_dir = (self.path / manifest.job_dir).resolve()
            # The manifest is a file others can write: its run folder is believed within the roots only.
            self._job_dir = job_dir if output_roots().within(job_dir) else None
        if self._recovered and read is not None:
            return False
        # First read in this process, or the manifest is gone or was corrupt: the images say what it lacks.
        self._recovered = True
        return self._recover() or read is None

    def _recover(self) -> bool:
        with os.scandir(self.path) as entries:
            names = [e.name for e in entries if e.is_file(follow_symlinks=False) and not e.name.startswith(".")
                     and e.name.lower().endswith(_IMAGE_SUFFIXES) and e.name != GRID]
        found = False
        for name in names:
            if name in self._renders:
                continue
            entry = read_record(self.path / name)
            if entry is not None and entry.image == name:
                log.info("%s: %s was written but not in the manifest; taken in from its record", self.path, name)
                self._renders[name] = entry
                self._pending.pop(name, None)
                self._failed.pop(name, None)
                found = True
        return found

    def _describe(self, target: OutputTarget) -> bool:
        head = self._head
        before = (head.title, head.source, head.job_dir, head.parity_gaps)
        head.title, head.source = target.title, relative(target.source, self.path)
        head.job_dir = relative(target.job_dir, self.path)
        head.parity_gaps = list(target.parity_gaps)
        if target.job_dir is not None:
            self._job_dir = Path(target.job_dir)
        return before != (head.title, head.source, head.job_dir, head.parity_gaps)

    def _add_render(self, op: RenderOp, thumbs: dict) -> None:
        entry = op.entry
        self._renders[entry.image] = entry
        self._json.pop(entry.image, None)
        self._pending.pop(entry.image, None)
        self._failed.pop(entry.image, None)
        self._head.model = entry.model
        if self.options.grid or self.options.page:
            thumb = thumbnail(op.image)
            atomic_write(self.path / pages.thumb_name(entry.image), jpeg_bytes(thumb))
            thumbs[(entry.image, 0)] = thumb
        self._images[entry.image] = op.image

    def _add_cell(self, op: CellOp) -> bool:
        image = op.cell.image
        if image in self._renders:
            return False
        into, other = (self._failed, self._pending) if op.failed else (self._pending, self._failed)
        known = into.get(image)
        if known is not None and known.error == op.cell.error and image not in other:
            return False
        into[image] = op.cell
        other.pop(image, None)
        return True

    def _backfill(self, thumbs: dict) -> bool:
        """Pair renders with ai-toolkit's own samples of the same step and prompt; ai-toolkit often
        finishes its sample of a step after we rendered it, so renders are paired on later writes."""
        images, self._images = self._images, {}
        if self._job_dir is None:
            return False
        samples = find_samples(self._job_dir)
        paired = False
        for entry in self._renders.values():
            sample = samples.get((entry.step, entry.prompt_index))
            if sample is None or entry.aitk_sample:
                continue
            ours = images.get(entry.image) or open_image(self.path / entry.image)
            if ours is None:
                continue
            entry.aitk_sample = os.path.relpath(sample, self.path)
            entry.aitk_sample_diff, thumb = compare(ours, sample)
            self._json.pop(entry.image, None)
            paired = True
            if thumb is not None and (self.options.grid or self.options.page):
                atomic_write(self.path / pages.thumb_name(entry.image, aitk=True), jpeg_bytes(thumb))
                thumbs[(entry.image, 1)] = thumb
        return paired

    def _manifest(self) -> Manifest:
        manifest = self._head.model_copy(update={
            "version": MANIFEST_VERSION, "updated_at": datetime.now(timezone.utc).isoformat(),
            "renders": list(self._renders.values()), "pending": list(self._pending.values()),
            "failed": list(self._failed.values())})
        manifest.summarise()
        return manifest

    # -- files --------------------------------------------------------------------------------
    def _write(self, manifest: Manifest, thumbs: dict, *, final: bool) -> None:
        atomic_write(self.path / MANIFEST, self._manifest_json(manifest))
        self._signature = _signature(self.path / MANIFEST)
        if not (self.options.grid or self.options.page):
            return
        table = tables.build(manifest)
        if self.options.page:
            atomic_write(self.path / pages.DATA, pages.manifest_js(manifest, table))
            if not self._page_written:
                html = pages.page_html()
                page = self.path / pages.PAGE
                if _read_or_none(page) != html:
                    atomic_write(page, html)
                self._page_written = True
        self.grid_stale = self.options.grid
        if self.options.grid and (final or self.grid_due() <= time.monotonic()):
            started = time.monotonic()
            atomic_write(self.path / GRID, self._painter.paint(
                table, manifest, lambda entry, slot: self._thumb(entry, slot, thumbs),
                aitk_column=self.options.aitk_column))
            self._grid_at = time.monotonic()
            self._grid_cost, self.grid_stale = self._grid_at - started, False

    def _manifest_json(self, manifest: Manifest) -> bytes:
        """manifest.json with one line per render, each serialised once and reused until it changes."""
        for entry in manifest.renders:
            if entry.image not in self._json:
                self._json[entry.image] = entry.model_dump_json()
        head = manifest.model_dump(mode="json", exclude={"renders"})
        renders = ",\n    ".join(self._json[r.image] for r in manifest.renders)
        text = json.dumps(head, indent=2, ensure_ascii=False)
        # Spliced in before the closing brace of the head object.
        listed = f"[\n    {renders}\n  ]" if renders else "[]"
        return (text[:-2] + f',\n  "renders": {listed}\n}}\n').encode()

    def _thumb(self, entry: RenderEntry, slot: int, fresh: dict) -> Image.Image | None:
        if (entry.image, slot) in fresh:
            return fresh[(entry.image, slot)]
        candidates = [self.path / pages.thumb_name(entry.image, aitk=slot == 1)]
        candidates.append(self.path / entry.aitk_sample if slot == 1 and entry.aitk_sample else self.path / entry.image)
        for path in candidates:
            # ai-toolkit's sample lies beside the folder, in the run; everything else inside it.
            image = open_image(path, inside_output=path.parent == self.path / pages.THUMBS or path.parent == self.path)
            if image is not None:
                return thumbnail(image)
        return None


def _read_or_none(path: Path) -> bytes | None:
    try:
        return read_bytes(path)
    except (OSError, OutboxError):
        return None


def _signature(path: Path) -> tuple | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)
