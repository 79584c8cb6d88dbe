"""Atomic file writes: a reader never sees half a file, a crash never leaves a corrupt one.

Everything is written under a hidden temporary name in the target's own folder (the watcher
ignores dot files) and renamed into place, which is atomic within one filesystem.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged(folder: Path, name: str) -> Iterator[Path]:
    """A temporary file in `folder` for the caller to fill and `os.replace` into place; removed
    if it is still there afterwards (the caller failed, or decided not to keep it)."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            # Mode 0666 less the process umask, as a plain open() creates files: mkstemp's 0600
            # would leave every output readable by previewd's user alone, whatever UMask says.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        break
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def process_umask() -> int:
    """The process umask, read without changing it (Linux's /proc), else by setting it back."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mode_as_opened(path: Path) -> None:
    """Give `path` the mode a plain open() would have created it with. safetensors 0.8 writes
    through a 0600 temporary file (safetensors issue 782), which would keep weights previewd
    writes from a service running as another user."""
    os.chmod(path, 0o666 & ~process_umask())


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename over `path`."""
    with staged(path.parent, path.name) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


@contextlib.contextmanager
def staged_copy(source: Path, folder: Path) -> Iterator[Path]:
    """A private copy of `source` in `folder` (copy_file_range: a reflink where the filesystem
    can), for the caller to check and rename into place."""
    with staged(folder, source.name) as tmp:
        shutil.copyfile(source, tmp)
        yield tmp


def atomic_copy(source: Path, target: Path) -> None:
    """Copy `source` to `target` so that `target` appears complete or not at all."""
    with staged_copy(source, target.parent) as tmp:
        os.replace(tmp, target)


def write_missing(files: dict[Path, bytes]) -> None:
    """Write each content-addressed file that does not exist yet (its name says its content)."""
    for path, data in files.items():
        if not path.exists():
            atomic_write(path, data)
