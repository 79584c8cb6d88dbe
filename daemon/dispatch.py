"""Between the inbox and the queue: what the watcher should skip, and carrying out each file's plan.

The `Planner` decides what a file means; the dispatcher does what that takes: it stores control
images, snapshots checkpoints (ai-toolkit deletes old ones, so a queued render must not depend on
the training folder), enqueues the tasks, and records rejections beside the files at fault.
Nothing here stops the daemon.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from previewd import outbox, rejections, snapshots
from previewd.config import Config
from previewd.errors import IntakeError, LoraError, shown
from previewd.fileio import write_missing
from previewd.inbox import Outcome
from previewd.intake.planner import JOB_CONFIG, Plan, Planner
from previewd.intake.safetensors_header import SafetensorsHeaderError
from previewd.queue.states import JobState
from previewd.queue.store import JobStore
from previewd.safe_files import RefusedFile, Roots
from previewd.spec import LoraSpec, RenderSpec
from previewd.tasks import RenderTask

LORA_FAILURE = f"{LoraError.__name__}: "
"""How a job that failed on its LoRA begins its last_error (the worker records `Type: message`)."""

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".partial", ".part", rejections.ERROR_SUFFIX, ".lock")


def lora_affinity(spec: RenderSpec) -> str | None:
    """The queue's affinity of a render: its checkpoint and multiplier, so that a worker takes the
    jobs of the LoRA it has applied, at the multiplier it has applied, one after the other (a
    multiplier change re-fuses or re-merges the LoRA)."""
    if spec.lora is None:
        return None
    return f"{spec.lora.sha256 or spec.lora.path}:{float(spec.lora.network_multiplier)!r}"


def affinity_checkpoint(affinity: str) -> str:
    """The checkpoint's sha256 in an affinity (jobs queued before multipliers joined it hold it alone)."""
    return affinity.rpartition(":")[0] if ":" in affinity else affinity


class Dispatcher:
    def __init__(self, config: Config, store: JobStore):
        self._config = config
        self._store = store
        self.planner = Planner(config)
        self._roots = Roots(config.confinement_roots)
        self._own = {Path(os.path.abspath(p)) for own in (config.state_dir, config.outbox_root)
                     for p in (own, own.resolve())}
        self._reported: set[tuple[Path, str]] = set()

    def ignore(self, path: Path) -> bool:
        """Files and folders the watcher should not even deliver. Judged by the path as found, not
        where a link leads: a link is delivered, and refused visibly if it leads out of the roots."""
        if any(part.startswith(".") for part in path.parts[-2:]) or path.name.endswith(IGNORED_SUFFIXES):
            return True
        absolute = Path(os.path.abspath(path))
        if any(absolute.is_relative_to(own) for own in self._own):
            return True
        # `path` may be a folder being scanned or a file. Preview folders carry the outbox's lock
        # file (created before their first image); ai-toolkit's samples/ sits in its run folder.
        for folder in (path, path.parent):
            if (folder / outbox.LOCK).exists():
                return True
            if folder.name == "samples" and (folder.parent / JOB_CONFIG).is_file():
                return True
        return False

    def handle(self, path: Path) -> Outcome:
        """Carry out the plan of a settled file; RETRY/STALLED: not ready yet, deliver it again later."""
        plan = self.planner.plan(path)
        for note in plan.notes:
            self._once(path, note)
        if not plan.ready:
            return Outcome.STALLED if plan.settled else Outcome.RETRY
        for error in plan.rejected:
            rejections.reject(Path(error.path), error)
        try:
            tasks = self.materialise(plan)
        except OSError as exc:  # a checkpoint vanished before it was copied: it is seen again if it returns
            self._once(path, f"cannot read: {exc}")
            return Outcome.DONE
        for accepted in plan.accepted:  # before the jobs: a known failure may say so beside it again
            rejections.clear(accepted)
        if tasks:
            self._enqueue(path, tasks)
        return Outcome.DONE

    def materialise(self, plan: Plan) -> list[RenderTask]:
        """Store the plan's control images and snapshot the LoRAs its tasks name; the tasks then
        name previewd's own copies, identified by content hash. A checkpoint snapshotted before and
        unchanged since is not read again unless a job not yet queued needs its copy (at start,
        every checkpoint of every watched run is delivered again). A checkpoint that cannot be kept
        (changed meanwhile, non-finite weights) is rejected beside it, and its tasks dropped; a
        request naming it is rejected as a whole."""
        write_missing(plan.assets)
        originals = sorted({task.spec.lora.path for task in plan.tasks
                            if task.spec.lora is not None and task.spec.lora.sha256 is None})
        snaps: dict[str, tuple[Path, str] | None] = {}
        pruned = set()  # recalled, but the copy is gone (its jobs were done)
        for path in originals:
            snaps[path] = snapshots.recall(Path(path), self._config.snapshot_dir)
            if snaps[path] is None:
                snaps[path] = self._snapshot(Path(path), plan)
            elif not snaps[path][0].is_file():
                pruned.add(path)
        tasks = self._with_snapshots(plan, snaps)
        if pruned:  # copied again only for a job not queued yet
            keys = {task.idempotency_key(): original for task, original in tasks if original in pruned}
            needed = {keys[key] for key in keys.keys() - self._store.existing_keys(keys)}
            if needed:
                snaps.update({path: self._snapshot(Path(path), plan) for path in sorted(needed)})
                tasks = self._with_snapshots(plan, snaps)
        if plan.request and any(snap is None for snap in snaps.values()):
            plan.accepted.clear()
            return []
        return [task for task, _ in tasks]

    @staticmethod
    def _with_snapshots(plan: Plan, snaps: dict[str, tuple[Path, str] | None]) -> list[tuple[RenderTask, str | None]]:
        """The plan's tasks naming the snapshots (each with the trainer's file it came from); tasks
        of a checkpoint that could not be kept are dropped."""
        tasks = []
        for task in plan.tasks:
            lora = task.spec.lora
            if lora is None or lora.sha256 is not None:
                tasks.append((task, None))
                continue
            if snaps[lora.path] is None:
                continue
            snap, digest = snaps[lora.path]
            spec = task.spec.model_copy(update={"lora": LoraSpec(
                path=str(snap), sha256=digest, network_multiplier=lora.network_multiplier)})
            tasks.append((task.model_copy(update={"spec": spec}), lora.path))
        return tasks

    def _snapshot(self, lora: Path, plan: Plan) -> tuple[Path, str] | None:
        try:
            return snapshots.snapshot(lora, self._config.snapshot_dir, roots=self._roots, limits=self._config.limits)
        except (SafetensorsHeaderError, RefusedFile) as exc:
            reason = exc.reason if isinstance(exc, RefusedFile) else str(exc)
        rejections.reject(lora, IntakeError(lora, "checkpoint", [f"(file): {reason}"]))
        if plan.request:
            rejections.reject(plan.source, IntakeError(plan.source, "request", [f"loras: {lora.name}: {reason}"]))
        if lora in plan.accepted:
            plan.accepted.remove(lora)
        return None

    def _enqueue(self, source: Path, tasks: list[RenderTask]) -> None:
        queued = 0
        options = outbox.Options.of(self._config.output)
        for task in tasks:
            job, created = self._store.enqueue(
                key=task.idempotency_key(), payload=task.model_dump(mode="json"), model=task.spec.model,
                group=task.target.out_dir, affinity=lora_affinity(task.spec),
                max_attempts=self._config.worker.max_attempts)
            queued += created
            # The page shows the cells to come: queued ones, and failed ones with their reason.
            if job.state in (JobState.QUEUED, JobState.RUNNING):
                outbox.record_cell(task, job_id=job.id, options=options)
            elif job.state == JobState.FAILED:
                outbox.record_cell(task, job_id=job.id, error=job.last_error or "failed", options=options)
                if (job.last_error or "").startswith(LORA_FAILURE):  # still true of the same file
                    rejections.lora_failed(task, job.last_error.removeprefix(LORA_FAILURE))
        # Start-up scans and rescans deliver every known file again: only news is worth a line.
        (log.info if queued else log.debug)("%s: %d job(s) queued, %d already known", shown(source), queued,
                                            len(tasks) - queued)

    def _once(self, path: Path, message: str) -> None:
        if (path, message) not in self._reported:
            self._reported.add((path, message))
            log.info("%s: %s", shown(path), message)
