"""The durable job queue. Knows nothing of models or pipelines: payloads are opaque JSON."""

from previewd.queue.errors import DatabaseUnavailable, SchemaVersionError
from previewd.queue.records import Job, JobEvent, Unreadable, Worker
from previewd.queue.states import TRANSITIONS, JobState
from previewd.queue.store import JobStore

__all__ = ["TRANSITIONS", "DatabaseUnavailable", "Job", "JobEvent", "JobState", "JobStore",
           "SchemaVersionError", "Unreadable", "Worker"]
