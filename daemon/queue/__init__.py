"""The durable job queue. Knows nothing of models or pipelines: payloads are opaque JSON."""

from previewd.queue.records import Job, JobEvent, Worker
from previewd.queue.states import TRANSITIONS, JobState
from previewd.queue.store import JobStore

__all__ = ["TRANSITIONS", "Job", "JobEvent", "JobState", "JobStore", "Worker"]
