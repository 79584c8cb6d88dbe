"""The outbox writer: folds manifest, grid and page changes on its own thread, off the render path.

The render thread writes each image itself (the job's result names it) and hands the rest here.
Changes to one folder are collected for `debounce` seconds and folded in one write; a folder whose
last fold took long waits longer before the next (`busy_share`), so bookkeeping never takes more
than that share of the writer's time however large the run grows. `flush()` folds everything now
and waits: the daemon calls it on shutdown, `previewd render` before it exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from previewd.errors import OutboxError
from previewd.outbox.folder import Folder, Op, Options

log = logging.getLogger(__name__)

_KEPT_FOLDERS = 16
"""Folders whose state (manifest, grid sheet) stays in memory between writes."""


class OutboxWriter:
    def __init__(self, *, debounce: float = 1.0, busy_share: float = 0.25):
        self._debounce = debounce
        self._busy_share = busy_share
        self._cond = threading.Condition()
        self._ops: dict[Path, list[Op]] = {}
        self._options: dict[Path, Options] = {}
        self._due: dict[Path, float] = {}
        self._rest_until: dict[Path, float] = {}
        self._folders: OrderedDict[Path, Folder] = OrderedDict()
        self._urgent = 0
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, out_dir: Path, op: Op, options: Options | None = None) -> None:
        with self._cond:
            self._ops.setdefault(out_dir, []).append(op)
            if options is not None:
                self._options[out_dir] = options
            if out_dir not in self._due:
                self._due[out_dir] = max(time.monotonic() + self._debounce, self._rest_until.get(out_dir, 0.0))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="previewd-outbox", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self) -> None:
        """Fold every pending change now; returns once they are on disk."""
        with self._cond:
            if self._thread is None:
                return
            self._urgent += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: not self._ops and not self._busy)
            finally:
                self._urgent -= 1

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (batch := self._ready()):
                    self._cond.wait(self._wait())
                final = bool(self._urgent)
                work = [(d, self._ops.pop(d), self._options.get(d)) for d in batch]
                for d in batch:
                    self._due.pop(d, None)
                self._busy = True
            try:
                for out_dir, ops, options in work:
                    self._fold(out_dir, ops, options, final=final)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _ready(self) -> list[Path]:
        if self._urgent:
            return list(self._ops)
        now = time.monotonic()
        return [d for d, due in self._due.items() if due <= now]

    def _wait(self) -> float | None:
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - time.monotonic())

    def _fold(self, out_dir: Path, ops: list[Op], options: Options | None, *, final: bool) -> None:
        folder = self._folders.pop(out_dir, None) or Folder(out_dir)
        if options is not None:
            folder.options = options
        started = time.monotonic()
        try:
            folder.fold(ops, final=final)
        except OutboxError as exc:  # a folder previewd will not write into (a link, a FIFO lock): said in a line
            log.error("%s: could not update the manifest, grid and page: %s", out_dir, exc)
            return
        except Exception:  # noqa: BLE001 - the images are written; their records restore the rest
            log.exception("%s: could not update the manifest, grid and page", out_dir)
            return  # its state is dropped: the next write reads the folder afresh
        took = time.monotonic() - started
        with self._cond:
            self._rest_until[out_dir] = time.monotonic() + took * (1 / self._busy_share - 1)
            if folder.grid_stale:  # painted later, with or without news; a flush paints it now
                self._ops.setdefault(out_dir, [])
                self._due.setdefault(out_dir, max(folder.grid_due(), self._rest_until[out_dir]))
        self._folders[out_dir] = folder
        while len(self._folders) > _KEPT_FOLDERS:
            self._folders.popitem(last=False)
