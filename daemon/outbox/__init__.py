"""Writes previews: images, manifest.json, manifest.js, grid.png and index.html, all atomically.

Every file goes to a temporary name in the same folder and is `os.replace`d into place, so a
reader never sees half a file and a crash never leaves a corrupt manifest. Files are created as a
plain open() creates them (0666 less the process umask). Output folders lie where others can
plant links and FIFOs: every path is written and read as files.py says (no link followed, no
folder outside the daemon's output roots, a lock that never waits forever).

The render thread writes each image itself (`write_render`); the manifest, grid and page are
folded in by the process's `OutboxWriter` on its own thread (folder.py, writer.py), debounced,
under the folder's file lock because several workers may share one folder. `flush()` waits for it.
"""

from __future__ import annotations

import atexit
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from previewd.errors import OutboxError
from previewd.manifest import BASE_ROW, Axes, PlannedCell, RenderEntry
from previewd.outbox import files
from previewd.outbox.folder import GRID, LOCK, MANIFEST, CellOp, Options, RenderOp, portable, read_manifest
from previewd.outbox.images import a1111_parameters, compare, encode_image, read_record
from previewd.outbox.page import DATA, PAGE, THUMBS
from previewd.outbox.writer import OutboxWriter
from previewd.tasks import OutputTarget, RenderTask

__all__ = ["DATA", "GRID", "LOCK", "MANIFEST", "PAGE", "THUMBS", "Options", "OutboxWriter", "a1111_parameters",
           "compare", "flush", "read_manifest", "read_record", "record_cell", "write_image", "write_render",
           "writer"]

log = logging.getLogger(__name__)

_writer: OutboxWriter | None = None
_writer_lock = threading.Lock()


def writer() -> OutboxWriter:
    """The process's outbox writer (started on first use, flushed at exit)."""
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = OutboxWriter()
            atexit.register(_writer.flush)
        return _writer


def flush() -> None:
    """Wait until every change handed to the process's writer is on disk."""
    if _writer is not None:
        _writer.flush()


def axes(target: OutputTarget) -> Axes:
    return Axes(checkpoint=target.checkpoint or BASE_ROW, prompt=target.prompt_index, strength=target.strength,
                seed=target.seed)


def write_image(target: OutputTarget, image: Image.Image, entry: RenderEntry) -> RenderEntry:
    """Write one render's image, carrying its record; returns the entry as the manifest holds it.
    Raises OutboxError for a folder previewd will not write into (a link, out of the roots)."""
    out_dir = Path(target.out_dir)
    entry = portable(entry.model_copy(update={
        "image": target.image_name, "rendered_at": datetime.now(timezone.utc).isoformat(),
        "axes": axes(target)}), out_dir)
    with files.folder(out_dir) as folder:
        folder.touch(LOCK)
        folder.write(target.image_name, encode_image(image, target.format, entry))
    return entry


def write_render(target: OutputTarget, image: Image.Image, entry: RenderEntry, *,
                 options: Options | None = None, wait: bool = False) -> RenderEntry:
    """Write one render's image now and hand it to the writer for the manifest, grid and page
    (`wait`: return once they are written too). Returns the manifest entry."""
    entry = write_image(target, image, entry)
    writer().submit(Path(target.out_dir), RenderOp(target, entry, image), options)
    if wait:
        flush()
    return entry


def record_cell(task: RenderTask, *, job_id: int | None = None, error: str | None = None,
                options: Options | None = None) -> None:
    """Show a cell that has no image yet on the page and grid: queued, or failed for good when
    `error` says why. Keeps the outbox free of the queue: callers say what the job's state is."""
    spec, target = task.spec, task.target
    cell = PlannedCell(
        image=target.image_name, checkpoint=target.checkpoint, step=target.step, prompt_index=target.prompt_index,
        prompt=spec.prompt, neg=spec.neg, network_multiplier=spec.lora.network_multiplier if spec.lora else None,
        axes=axes(target), seed=spec.seed, width=spec.width, height=spec.height, job_id=job_id, error=error,
        at=datetime.now(timezone.utc).isoformat())
    out_dir = Path(target.out_dir)
    try:
        files.mark(out_dir)
    except OutboxError as exc:  # a folder previewd will not write into: its renders fail, and say so
        log.warning("%s", exc)
        return
    writer().submit(out_dir, CellOp(target, cell, failed=error is not None), options)
