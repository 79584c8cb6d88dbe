"""Watches the inbox and training folders; hands over files once they are completely written.

watchdog's dispatcher thread only records paths. A settle thread decides when a file is ready:
its size and mtime unchanged for `settle_seconds` (ai-toolkit writes checkpoints in place,
slowly). Then `on_ready(path)` runs on that thread and says what became of it (`Outcome`): a file
not usable yet (an inconsistent safetensors header, a control image still downloading) is checked
again later. Events can be lost, so there is a scan at start and a full rescan every
`rescan_seconds`. Paths are judged by lstat: a link is delivered as a link, never followed here.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """What became of a delivered file."""

    DONE = "done"
    """Handled (queued, rejected or left alone): delivered again only once it changes."""
    RETRY = "retry"
    """Not ready: a file it names is being written, a URL downloaded; delivered again later."""
    STALLED = "stalled"
    """Not ready, and only time changes that (an incomplete checkpoint waiting out its limit):
    delivered again later, but it does not keep the watcher from being idle."""


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    stable_since: float
    stalled: bool = False


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: InboxWatcher):
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._record(event)
        except Exception:  # never let one odd path stop watchdog's dispatcher thread
            log.exception("cannot handle file event %s", event)

    def _record(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "deleted", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = Path(os.fsdecode(raw))
            if event.is_directory:
                # A folder moved away is scanned where it went: its old name may be a link by now.
                if event.event_type == "created" or (event.event_type == "moved" and raw == event.dest_path):
                    self._watcher.scan_dir(path)
            else:
                self._watcher.touch(path)


class InboxWatcher:
    def __init__(self, roots: Iterable[Path], on_ready: Callable[[Path], Outcome | bool], *,
                 ignore: Callable[[Path], bool], settle_seconds: float = 5.0,
                 rescan_seconds: float = 60.0, polling: bool = False):
        self.roots = [Path(r) for r in roots]
        self._on_ready = on_ready
        self._ignore = ignore
        self._settle = settle_seconds
        self._rescan = rescan_seconds
        self._observer = PollingObserver() if polling else Observer()
        self._pending: dict[Path, _Pending] = {}
        self._handled: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="previewd-settle", daemon=True)

    def start(self) -> None:
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)
            self._observer.schedule(_Handler(self), str(root), recursive=True)
        self._observer.start()
        self.rescan()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._observer.stop()
        self._observer.join(timeout=5)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def idle(self) -> bool:
        """Nothing waiting to settle but files stalled on a time limit, and no file being handed over."""
        with self._lock:
            return not self._busy and all(p.stalled for p in self._pending.values())

    def stalled(self) -> list[Path]:
        """Files that wait only for time to pass."""
        with self._lock:
            return sorted(path for path, p in self._pending.items() if p.stalled)

    def touch(self, path: Path) -> None:
        if self._ignore(path):
            return
        stat = _stat(path)
        if stat is None:
            return
        with self._lock:
            if self._handled.get(path) == stat:
                return
            current = self._pending.get(path)
            if current is None or (current.size, current.mtime_ns) != stat:
                self._pending[path] = _Pending(*stat, stable_since=time.monotonic())
        self._wake.set()

    def scan_dir(self, directory: Path, *, root: bool = False) -> None:
        """Deliver every file below `directory`. A link is delivered as the link, never walked,
        unless it is a root (the configured folder may be a link)."""
        if not root and os.path.islink(directory):  # os.walk would list where it leads
            self.touch(directory)
            return
        for dirpath, dirnames, filenames in os.walk(directory):  # nor does os.walk follow links below
            base = Path(dirpath)
            dirnames[:] = [d for d in dirnames if not self._ignore(base / d)]
            for name in filenames:
                self.touch(base / name)
            for name in dirnames:  # a link to a folder is delivered as the link (os.walk does not enter it)
                if os.path.islink(base / name):
                    self.touch(base / name)

    def rescan(self) -> None:
        for root in self.roots:
            self.scan_dir(root, root=True)

    def _run(self) -> None:
        next_rescan = time.monotonic() + self._rescan
        while not self._stop.is_set():
            self._wake.wait(timeout=min(0.5, max(self._settle / 2, 0.05)))
            self._wake.clear()
            now = time.monotonic()
            try:
                if now >= next_rescan:
                    next_rescan = now + self._rescan
                    self.rescan()
                for path in self._due(now):
                    if self._stop.is_set():
                        break
                    self._deliver(path)
            except Exception:  # the watcher must outlive any one bad file or folder
                log.exception("inbox watcher: error while scanning; continuing")

    def _due(self, now: float) -> list[Path]:
        due = []
        with self._lock:
            for path, pending in list(self._pending.items()):
                stat = _stat(path)
                if stat is None:
                    del self._pending[path]
                elif (pending.size, pending.mtime_ns) != stat:
                    self._pending[path] = _Pending(*stat, stable_since=now)
                elif now - pending.stable_since >= self._settle:
                    due.append(path)
        return sorted(due)

    def _deliver(self, path: Path) -> None:
        stat = _stat(path)
        with self._lock:
            self._busy = True
        try:
            outcome = self._on_ready(path)
        except Exception:
            # A bug in intake must not kill the watcher; the file is tried again once it changes.
            log.exception("intake of %s failed unexpectedly", os.fsencode(path))
            outcome = Outcome.DONE
        finally:
            with self._lock:
                self._busy = False
        if isinstance(outcome, bool):
            outcome = Outcome.DONE if outcome else Outcome.RETRY
        with self._lock:
            if outcome is Outcome.DONE:
                self._pending.pop(path, None)
                if stat is not None:
                    self._handled[path] = stat
            elif path in self._pending:
                self._pending[path].stable_since = time.monotonic()
                self._pending[path].stalled = outcome is Outcome.STALLED
