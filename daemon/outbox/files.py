"""Every file the outbox writes or reads, through previewd.safe_files.

An output folder sits in the inbox or a training folder, where others can plant links, FIFOs and
huge images. So the outbox creates its folders itself, below a folder that lies within the
daemon's output roots (`safe_files.confine_outputs`); every file it writes is created there
without following a link and renamed over its name (a link planted at the name is replaced);
every file it reads must be a regular file, not a link, of bounded size; the folder lock is taken
with a timeout and never waits on a FIFO; only PNG, JPEG and WebP images of bounded size are
decoded. A folder swapped for a link is refused (`UnsafeFolder`, an OutboxError).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import Image

from previewd.safe_files import RefusedFile, SafeDir, UnsafeFolder, open_regular, output_roots

LOCK_TIMEOUT = 120.0
"""Longest wait for another writer of the same folder (a fold takes seconds at most)."""
MAX_READ = 64 << 20
"""Largest manifest, page or image the outbox reads back."""
MAX_PIXELS = 64_000_000
"""Largest image the outbox decodes (renders are at most 4096², grid sheets at most 8192²)."""
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def folder(path: Path, *, create: bool = True) -> SafeDir:
    """The output folder `path`, created if missing (and `create`), within the output roots."""
    return SafeDir.open(path, output_roots(), create=create)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` in its folder (created if missing) atomically, never through a link."""
    with folder(path.parent) as where:
        where.write(path.name, data)


def read_bytes(path: Path, max_bytes: int = MAX_READ) -> bytes:
    """A regular file of an output folder (not a link, not a FIFO); FileNotFoundError if missing."""
    with folder(path.parent, create=False) as where:
        return where.read(path.name, max_bytes)


@contextlib.contextmanager
def open_file(path: Path) -> Iterator[IO[bytes]]:
    with folder(path.parent, create=False) as where, where.open_file(path.name) as handle:
        yield handle


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """The folder's lock, held across a fold; OutboxError after LOCK_TIMEOUT seconds of waiting."""
    from previewd.outbox.folder import LOCK

    with folder(out_dir) as where, where.lock(LOCK, LOCK_TIMEOUT):
        yield


def mark(out_dir: Path) -> None:
    """Create the folder and its lock file (before its first image, so the watcher skips it)."""
    from previewd.outbox.folder import LOCK

    with folder(out_dir) as where:
        where.touch(LOCK)


def open_image(path: Path, *, inside_output: bool = True) -> Image.Image | None:
    """The image at `path` decoded as RGB, or None when it is missing, not a regular file, not a
    PNG/JPEG/WebP image or too large. `inside_output` False: a file elsewhere within the output
    roots (ai-toolkit's samples beside a run), which must be a regular file but may be a link."""
    try:
        if inside_output:
            with open_file(path) as handle:
                return _decode(handle)
        with open_regular(path, output_roots(), max_bytes=MAX_READ) as handle:
            return _decode(handle)
    except (OSError, ValueError, RefusedFile, UnsafeFolder, Image.DecompressionBombError):
        return None


def _decode(handle: IO[bytes]) -> Image.Image | None:
    if os.fstat(handle.fileno()).st_size > MAX_READ:
        return None
    with Image.open(handle, formats=IMAGE_FORMATS) as image:
        if image.width * image.height > MAX_PIXELS:
            return None
        return image.convert("RGB")
