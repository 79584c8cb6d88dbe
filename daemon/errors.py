"""Exceptions of previewd. Each docstring is the default message (procrastinate style).

Only `previewd.cli` turns these into exit codes; everything else raises.
"""

from __future__ import annotations

import os


def shown(path: str | os.PathLike[str]) -> str:
    """`path` as one line of text that can always be written and logged: bytes that are not UTF-8
    (kept by Python as surrogate escapes) appear as \\xNN, control characters (a newline in a
    file name would forge a log line) as escapes too."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class PreviewdError(Exception):
    """previewd failed."""

    #: Exit code the command line uses for this error.
    exit_code = 1

    def __init__(self, message: str | None = None):
        super().__init__(message or self.__doc__)


class ConfigError(PreviewdError):
    """The configuration is invalid."""

    exit_code = 2


class IntakeError(PreviewdError):
    """An input file could not be turned into render jobs.

    `path` is the file that was dropped, `kind` what it was read as ("aitk-job", "request",
    "checkpoint"), `problems` a list of "dotted.field: message" lines.
    """

    MAX_PROBLEMS = 30
    MAX_LINE = 1000

    def __init__(self, path: str, kind: str, problems: list[str]):
        self.path = str(path)
        self.kind = kind
        # One short line per problem, however much of a hostile file a message quotes.
        lines = [" ".join(str(p).split()) for p in problems]
        lines = [p if len(p) <= self.MAX_LINE else p[:self.MAX_LINE - 1] + "…" for p in lines]
        if len(lines) > self.MAX_PROBLEMS:
            lines = lines[:self.MAX_PROBLEMS] + [f"... and {len(lines) - self.MAX_PROBLEMS} more problem(s)"]
        self.problems = lines
        listed = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{shown(self.path)}: invalid {kind} ({len(problems)} problem(s)):\n{listed}")


class NotReady(PreviewdError):
    """An input names a file that is still being written; it is read again later.

    `settled`: only time can change the outcome (a checkpoint left incomplete, refused once
    `limits.incomplete_checkpoint_minutes` pass), so `--exit-when-idle` need not wait for it.
    """

    def __init__(self, message: str | None = None, *, settled: bool = False):
        super().__init__(message)
        self.settled = settled


class ControlImageError(PreviewdError):
    """A control image could not be loaded."""


class JobStateError(PreviewdError):
    """A job was not in the state the operation expects."""


class PipelineError(PreviewdError):
    """Rendering failed."""

    #: False when retrying the same render cannot help (bad LoRA, bad spec).
    transient = False


class ModelNotFound(PipelineError):
    """The model's files are not on this machine (previewd never downloads)."""


class PipelineOutOfMemory(PipelineError):
    """The device ran out of memory while rendering."""

    transient = True


class RenderInterrupted(PipelineError):
    """The render was stopped before it finished (shutdown or cancel)."""

    transient = True


class LoraError(PipelineError):
    """The LoRA file cannot be applied to this model."""


class NonFiniteOutput(PipelineError):
    """The render produced NaN or infinite values (it would be saved as a black image)."""


class OutboxError(PreviewdError):
    """Writing previews failed."""
