"""Logging set-up: one line per event, journald priorities under systemd, no terminal escapes in files.

Under systemd, stderr is connected to the journal (`JOURNAL_STREAM` names that stream). The
journal then adds its own timestamps, and a `<N>` prefix on a line sets its priority (sd-daemon(3)),
so `journalctl -p err -u previewd` shows failures. Elsewhere lines carry a timestamp.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

# syslog priorities (sd-daemon(3)): 3 err, 4 warning, 6 info, 7 debug; critical is 2.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\r")


def stream_is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd connected (device:inode in JOURNAL_STREAM)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


class PlainFormatter(logging.Formatter):
    """Strips terminal control sequences (progress bars, colours) from every line that is not
    going to a terminal, and prefixes the journal priority when writing to the journal."""

    def __init__(self, *, journal: bool):
        fmt = "%(levelname)s %(name)s: %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = _ESCAPES.sub("", super().format(record))
        if not self._journal:
            return text
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        # Every line of a multi-line message (a traceback) keeps the priority.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def setup_logging(level: str, stream: TextIO = sys.stderr) -> None:
    """Configure the root logger once for the whole process (replacing earlier handlers)."""
    handler = logging.StreamHandler(stream)
    if stream.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(PlainFormatter(journal=stream_is_journal(stream)))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


@contextlib.contextmanager
def still_busy(logger: logging.Logger, what: str, every: float = 30.0) -> Iterator[None]:
    """Log "still <what> (N s)" every `every` seconds while the block runs: a model load shows a
    progress bar on a terminal, and in a log it would otherwise look like a hang."""
    done = threading.Event()
    started = time.monotonic()

    def tell() -> None:
        while not done.wait(every):
            logger.info("still %s (%.0f s)", what, time.monotonic() - started)

    teller = threading.Thread(target=tell, name="previewd-still-busy", daemon=True)
    teller.start()
    try:
        yield
    finally:
        done.set()
        teller.join()
