"""Rejected inputs are visible where the user looks: `<file>.error.txt` beside the file, and in
`previewd status`. An error file disappears again once the file is read without a problem."""

from __future__ import annotations

import logging
from pathlib import Path

from previewd.errors import PreviewdError
from previewd.fileio import atomic_write

log = logging.getLogger(__name__)

ERROR_SUFFIX = ".error.txt"
_HEADER = "previewd could not use this file."


def error_file(path: Path) -> Path:
    return path.with_name(path.name + ERROR_SUFFIX)


def reject(path: Path, exc: PreviewdError) -> None:
    """Log `exc` and write it beside `path`."""
    log.error("%s", exc)
    record(path, str(exc))


def record(path: Path, reason: str) -> None:
    """Write `reason` beside `path` (unless its error file already says exactly this)."""
    text = f"{_HEADER}\n\n{reason}\n\nFix the file (or replace it) and previewd reads it again.\n"
    try:
        target = error_file(path)
        # atomic_write renames over the name, so a planted symlink is replaced, never followed.
        if target.is_symlink() or not target.exists() or target.read_text() != text:
            atomic_write(target, text.encode())
    except OSError as write_error:
        log.error("%s: cannot write the error file: %s", path, write_error)


def clear(path: Path) -> None:
    error_file(path).unlink(missing_ok=True)


def rejected_inputs(roots: list[Path]) -> list[tuple[Path, str]]:
    """Inputs that currently carry an error file, with the reason, for `previewd status`."""
    found = []
    for root in roots:
        for marker in sorted(root.rglob(f"*{ERROR_SUFFIX}")):
            if marker.is_symlink() or not marker.is_file():
                continue
            reason = marker.read_text(errors="replace").removeprefix(_HEADER).strip().split("\n\n")[0]
            found.append((marker.with_name(marker.name.removesuffix(ERROR_SUFFIX)), reason))
    return found
