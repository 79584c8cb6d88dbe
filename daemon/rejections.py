"""Rejected inputs are visible where the user looks: `<file>.error.txt` beside the file, and in
`previewd status`. An error file disappears again once the file is read without a problem.

Where a name cannot carry an error file (its folder is not writable, the name plus the suffix is
longer than the filesystem allows), the rejection goes to `rejected.log` in state_dir instead, one
line per problem, and `status` lists that too. Names that are not UTF-8 are written with \\xNN
escapes; no message quotes a traceback.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path

from previewd.errors import PreviewdError, shown
from previewd.safe_files import RefusedFile, SafeDir, UnsafeFolder, output_roots, read_regular
from previewd.tasks import RenderTask

log = logging.getLogger(__name__)

ERROR_SUFFIX = ".error.txt"
REJECTED_LOG = "rejected.log"
_HEADER = "previewd could not use this file."
_MAX_ERROR_FILE = 1 << 16
"""Error files are short; status reads no more than this of one (a planted one may be huge)."""
_MAX_LINE = 400
_MAX_LOG = 1 << 20
"""rejected.log is started afresh (the old one kept as rejected.log.1) beyond this size."""

_log_path: Path | None = None
_log_lock = threading.Lock()


def configure(state_dir: Path | None) -> None:
    """Where rejections that cannot be written beside their file go (None: only the log)."""
    global _log_path
    _log_path = None if state_dir is None else Path(state_dir) / REJECTED_LOG


def error_file(path: Path) -> Path:
    return path.with_name(path.name + ERROR_SUFFIX)


def reject(path: Path, exc: PreviewdError) -> None:
    """Log `exc` and write it beside `path`."""
    log.error("%s", exc)
    record(path, str(exc))


def lora_failed(task: RenderTask, error: str) -> None:
    """A LoRA that could not be applied, said beside the checkpoint or request that names it."""
    record(task.lora_source(), f"rendering with it failed: {error}")


def record(path: Path, reason: str) -> None:
    """Write `reason` beside `path` (unless its error file already says exactly this); where that
    is impossible, append it to rejected.log."""
    reason = "\n".join(shown(line) for line in reason.split("\n"))
    text = f"{_HEADER}\n\n{reason}\n\nFix the file (or replace it) and previewd reads it again.\n"
    name = path.name + ERROR_SUFFIX
    try:
        with SafeDir.open(path.parent, output_roots(), create=False) as folder:
            current = folder.stat(name)
            # The write renames over the name, so a planted link is replaced, never followed.
            if (current is None or not stat.S_ISREG(current.st_mode) or current.st_size != len(text.encode())
                    or folder.read(name, _MAX_ERROR_FILE) != text.encode()):
                folder.write(name, text.encode())
        return
    except (OSError, UnsafeFolder) as write_error:
        problem = write_error.strerror if isinstance(write_error, OSError) and write_error.strerror else write_error
        log.error("%s: cannot write the error file (%s); recorded in %s", shown(path), problem,
                  _log_path or "the log only")
    _append(path, reason)


def _append(path: Path, reason: str) -> None:
    if _log_path is None:
        return
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"{stamp}\t{shown(path)}\t{_one_line(line)}\n" for line in reason.splitlines() if line.strip()]
    with _log_lock:
        try:
            _log_path.parent.mkdir(parents=True, exist_ok=True)
            if _log_path.is_file() and _log_path.stat().st_size > _MAX_LOG:
                os.replace(_log_path, _log_path.with_name(REJECTED_LOG + ".1"))
            fd = os.open(_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            with os.fdopen(fd, "a", encoding="utf-8") as handle:
                handle.writelines(lines)
        except OSError as exc:
            log.error("%s: cannot append to %s: %s", shown(path), _log_path, exc.strerror)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_LINE else text[:_MAX_LINE - 1] + "…"


def clear(path: Path) -> None:
    try:
        error_file(path).unlink(missing_ok=True)
    except OSError as exc:  # e.g. a name too long to carry the suffix: there is none to clear
        log.debug("%s: %s", shown(path), exc)


def rejected_inputs(roots: list[Path]) -> list[tuple[Path, str]]:
    """Inputs that currently carry an error file, with the reason, for `previewd status`."""
    found = []
    for root in roots:
        for marker in sorted(root.rglob(f"*{ERROR_SUFFIX}")):
            try:
                data = read_regular(marker, [root], max_bytes=_MAX_ERROR_FILE)
            except (OSError, RefusedFile):  # a planted link, FIFO or huge file is no error file of ours
                continue
            reason = data.decode(errors="replace").removeprefix(_HEADER).strip().split("\n\n")[0]
            found.append((marker.with_name(marker.name.removesuffix(ERROR_SUFFIX)), reason))
    return found


def logged_rejections(state_dir: Path, limit: int = 20) -> list[dict[str, str]]:
    """The newest lines of rejected.log (inputs that could carry no error file), newest first."""
    try:
        data = read_regular(Path(state_dir) / REJECTED_LOG, None, max_bytes=2 * _MAX_LOG)
    except (OSError, RefusedFile):
        return []
    entries = []
    for line in reversed(data.decode(errors="replace").splitlines()):
        at, _, rest = line.partition("\t")
        path, _, reason = rest.partition("\t")
        if reason:
            entries.append({"at": at, "path": path, "reason": reason})
        if len(entries) >= limit:
            break
    return entries
