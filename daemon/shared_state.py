"""What several workers must share, checked.

A queued job names its files (the checkpoint snapshot, stored control images) by the path where
the worker that queued it wrote them, under `state_dir`. Workers on several hosts must therefore
see one `state_dir`, mounted at the same path everywhere. Two checks:

* start-up: every worker writes a probe file into the snapshot folder and records its path in the
  database; a starting worker reads the probes of the live others through the recorded paths.
  A missing probe means state_dir is not shared; a probe with other content means this host has
  a different folder at that path.
* claim: a worker that cannot read a job's files gives the job back for others instead of
  failing it (`JobStore.release_unreadable`).

`previewd doctor` can run `check_peers` and `first_unreadable` on its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from previewd.fileio import atomic_write
from previewd.queue.records import Worker
from previewd.tasks import RenderTask

# Dot files: the snapshot pruner and the inbox watcher skip them.
PROBE_PREFIX = ".probe-"
_CLOCK = ".clock"


def job_files(task: RenderTask) -> list[str]:
    """The files a job reads besides the model: its LoRA, control images and a local accuracy
    recovery adapter (a hub path one is looked up in each host's own cache)."""
    files = [task.spec.lora.path] if task.spec.lora else []
    ara = task.spec.aitk.ara
    adapter = [ara] if ara is not None and os.path.isabs(ara) else []
    return files + [image.path for image in task.spec.control_images] + adapter


def first_unreadable(paths: Iterable[str]) -> str | None:
    """The first of `paths` this process cannot open and read, or None."""
    for path in paths:
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError:
            return path
    return None


def write_probe(folder: Path, worker_id: str) -> Path:
    """Write this worker's probe (its id) into `folder`; returns its path."""
    path = folder / (PROBE_PREFIX + worker_id.replace(os.sep, "_"))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, worker_id.encode())
    return path


def remove_probe(path: str | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


def check_peers(workers: Iterable[Worker], own_id: str | None = None) -> list[str]:
    """Problems reading the probes of the live workers other than `own_id`; empty when this host
    sees the same state folder as all of them."""
    problems = []
    for worker in workers:
        if worker.id == own_id or worker.gone_at is not None or not worker.probe:
            continue
        where = f"worker {worker.id} on host {worker.hostname}"
        try:
            content = Path(worker.probe).read_bytes().decode(errors="replace")
        except OSError as exc:
            problems.append(f"cannot read {worker.probe}, written by {where} ({exc.strerror}): "
                            f"state_dir must be one folder that every host mounts at the same path")
            continue
        if content != worker.id:
            problems.append(f"{worker.probe} is not the file {where} wrote: this host has another "
                            f"folder at that path; state_dir must be one folder shared by every host")
    return problems


def filesystem_now(folder: Path) -> float:
    """The current time of the filesystem holding `folder` (the file server's clock on a network
    mount), to compare with its files' times when this host's clock may be off."""
    path = folder / _CLOCK
    folder.mkdir(parents=True, exist_ok=True)
    path.touch()  # utime(NOW): a network filesystem stamps it with its server's time
    return path.stat().st_mtime
