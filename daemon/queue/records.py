"""What the store returns: frozen values, never database rows."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from previewd.queue.states import JobState


class _FromRow:
    @classmethod
    def from_row(cls, row):
        mapping = row._mapping
        return cls(**{f.name: mapping[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Job(_FromRow):
    id: int
    key: str
    state: JobState
    priority: int
    model: str
    affinity: str | None
    group: str
    payload: dict[str, Any]
    """Opaque to the queue; the worker decides what it means."""
    attempts: int
    """Runs started so far, counting the current one; `release` gives a run back."""
    max_attempts: int
    worker_id: str | None
    """The worker running the job, or the last one that did once it has finished."""
    lease_expires_at: datetime | None
    run_after: datetime | None
    progress: float | None
    phase: str | None
    """What it is doing while running (loading model, encoding prompts, denoising, decoding, writing)."""
    step: int | None
    steps: int | None
    last_error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class JobEvent(_FromRow):
    id: int
    job_id: int
    at: datetime
    from_state: JobState | None
    """None for the event that records the enqueue."""
    to_state: JobState
    worker_id: str | None
    message: str | None


@dataclass(frozen=True)
class Worker(_FromRow):
    id: str
    hostname: str
    pid: int
    started_at: datetime
    last_heartbeat: datetime
    current_job_id: int | None
    device: str | None
    model: str | None
    """The model it has loaded, if any."""
    gone_at: datetime | None
    """When it was found to have stopped heartbeating; None while it is live."""
    probe: str | None
    """A file it wrote in the shared state folder, which every other worker must be able to read."""


@dataclass(frozen=True)
class Unreadable(_FromRow):
    """A worker could not read a file of a job, gave the job back and skips it until `until`."""

    job_id: int
    worker_id: str
    hostname: str
    path: str
    at: datetime
    until: datetime
