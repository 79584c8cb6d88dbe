"""What the queue raises besides `previewd.errors.JobStateError`."""

from __future__ import annotations

from previewd.errors import PreviewdError


class DatabaseUnavailable(PreviewdError):
    """The queue database cannot be reached right now (server restarting, network down, SQLite
    locked beyond its busy timeout). Transient: callers retry with backoff; nothing was changed
    unless the connection dropped during the commit itself."""


class SchemaVersionError(PreviewdError):
    """The queue database's schema is not one this previewd can use."""
