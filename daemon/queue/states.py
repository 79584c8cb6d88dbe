"""Job states and the transitions between them.

The store guards every change with `WHERE state=<expected>`; this table is the list of changes
it may make, and the tests check every recorded event against it.
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    #: Waiting to be claimed (possibly not before `run_after`, after a transient failure).
    QUEUED = "queued"
    #: Claimed by one worker, which holds a lease and must heartbeat to keep it.
    RUNNING = "running"
    #: Rendered and recorded; terminal, so the same key is never rendered again.
    DONE = "done"
    #: Gave up: a permanent error, attempts used up, or the worker vanished too often.
    FAILED = "failed"
    #: Stopped by the user; a running worker finds out when its heartbeat returns False.
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


#: Allowed changes: `TRANSITIONS[src]` is the set of states a job in `src` may move to.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    # Back to queued: retry after a transient error, release on shutdown, or an expired lease.
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.QUEUED,
                                 JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}


def is_allowed(src: JobState, dst: JobState) -> bool:
    return dst in TRANSITIONS[src]
