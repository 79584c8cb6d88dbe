"""The worker: claims jobs, renders them through the hot pipeline, writes the outbox, records
the outcome (huey's Worker; the diffusion sampler is what diffusers calls a scheduler).

The only module that knows both the queue and the pipelines. `Renderer` (one hot pipeline, no
queue) is also what `previewd render` uses, so a one-off render takes the same code path.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from previewd import outbox, shared_state
from previewd.aitk_samples import find_samples
from previewd.config import Config
from previewd.errors import JobStateError, PipelineError, PipelineOutOfMemory, RenderInterrupted
from previewd.manifest import ControlRef, RenderEntry
from previewd.queue import DatabaseUnavailable, Job, JobState, JobStore
from previewd.retry import RetryPolicy
from previewd.spec import ModelSource, RenderResult
from previewd.tasks import RenderTask

log = logging.getLogger(__name__)

# A worker that cannot read a job's files skips the job this long before it looks again.
_RECHECK_UNREADABLE_SECONDS = 300.0

_VERSIONED = ("previewd", "torch", "diffusers", "transformers", "peft", "optimum-quanto")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class Renderer:
    """Keeps one pipeline loaded; swaps models only when a task needs another one."""

    def __init__(self, config: Config, factory: Callable[..., Any] | None = None):
        self._config = config
        self._factory = factory
        self._pipeline = None
        self._source: ModelSource | None = None
        self.model: str | None = None
        self.lora_sha: str | None = None
        self._versions = library_versions()

    def _get(self, model_id: str, base: str | None):
        source = self._config.model_source(model_id, base)
        if self.model == model_id and self._source == source and self._pipeline is not None:
            return self._pipeline
        self.close()
        factory = self._factory
        if factory is None:
            from previewd import pipelines

            factory = pipelines.create
        pipeline = factory(model_id, source, device=self._config.device, dtype=self._config.dtype)
        self._wait_for_memory(getattr(pipeline, "device", "cpu"))
        started = time.monotonic()
        pipeline.load()
        log.info("loaded %s from %s in %.1fs", model_id, source.path, time.monotonic() - started)
        self._pipeline, self.model, self._source = pipeline, model_id, source
        return pipeline

    def _wait_for_memory(self, device: str) -> None:
        """Training shares the GPU: wait until the configured amount of device memory is free."""
        wanted = self._config.worker.min_free_vram_gb * 2**30
        if wanted <= 0 or not str(device).startswith("cuda"):
            return
        from previewd.pipelines.device import free_bytes

        while (free := free_bytes(device)) is not None and free < wanted:
            log.info("waiting for %.1f GiB free on %s (%.1f GiB free)", wanted / 2**30, device, free / 2**30)
            time.sleep(self._config.worker.idle_poll_seconds)

    def render(self, task: RenderTask, *, on_step=None, should_stop=None) -> RenderResult:
        try:
            result = self._get(task.spec.model, task.spec.base).render(task.spec, on_step=on_step, should_stop=should_stop)
        except PipelineOutOfMemory as exc:
            message = str(exc)
        else:
            self.lora_sha = task.spec.lora.sha256 if task.spec.lora else None
            return result
        # Outside the except block, so no traceback frame still holds the pipeline's tensors when it
        # is released: training shares the GPU, give the memory back and let the retry wait for it.
        self.close()
        raise PipelineOutOfMemory(message)

    def write(self, task: RenderTask, result: RenderResult, *, job_id: int | None = None) -> RenderEntry:
        """Put the image and its record into the outbox."""
        spec, target = task.spec, task.target
        entry = RenderEntry(
            job_id=job_id, model=spec.model, base=spec.base, checkpoint=target.checkpoint,
            checkpoint_sha256=spec.lora.sha256 if spec.lora else None, step=target.step,
            prompt_index=target.prompt_index, prompt=spec.prompt, neg=spec.neg, seed=result.seed,
            requested_seed=spec.seed, width=result.width, height=result.height, requested_width=spec.width,
            requested_height=spec.height, sample_steps=spec.sample_steps, guidance_scale=spec.guidance_scale,
            network_multiplier=spec.lora.network_multiplier if spec.lora else None, parity=spec.parity,
            control_images=[ControlRef(slot=c.slot, sha256=c.sha256) for c in spec.control_images],
            record=result.record, timings=result.timings, versions=self._versions, source=target.source)
        samples = find_samples(Path(target.job_dir)) if target.job_dir else {}
        return outbox.write_render(target, result.image, entry, aitk_samples=samples,
                                   grid=self._config.output.grid, page=self._config.output.html)

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.unload()
        self._pipeline, self._source, self.model, self.lora_sha = None, None, None, None


class Worker:
    """Runs one job at a time. `beat()` is called from the service's tick thread, also while a
    model loads or renders, and renews the running job's lease.

    The database may go away mid-job (a server restart): the render goes on, and its outcome is
    recorded once the database is back (`_persist`), unless the lease was lost meanwhile.
    """

    def __init__(self, store: JobStore, renderer: Renderer, config: Config, worker_id: str):
        self._store = store
        self._renderer = renderer
        self._config = config
        self._worker = worker_id
        self._policy = RetryPolicy(max_attempts=config.worker.max_attempts,
                                   base_delay=config.worker.retry_delay_seconds)
        self.current: Job | None = None
        self.progress: float | None = None
        self._lost = threading.Event()
        self._last_renewal = 0.0
        self._reconnect = RetryPolicy(base_delay=1.0, max_delay=15.0)

    def run_once(self, stop: threading.Event) -> bool:
        """Claim and run one job. False when there was nothing to do."""
        job = self._store.claim(self._worker, lease_seconds=self._config.worker.lease_seconds,
                                prefer_model=self._renderer.model, prefer_affinity=self._renderer.lora_sha)
        if job is None:
            return False
        self._lost.clear()
        self.progress = None
        self._last_renewal = time.monotonic()
        self.current = job
        try:
            self._run(job, stop)
        finally:
            self.current = None
        return True

    def beat(self) -> None:
        """Renew the running job's lease every heartbeat period; notice when it is no longer ours
        (cancelled, or taken over after an expiry)."""
        job = self.current
        now = time.monotonic()
        if job is None or now - self._last_renewal < self._config.worker.heartbeat_seconds:
            return
        self._last_renewal = now
        alive = self._store.heartbeat(job.id, self._worker, lease_seconds=self._config.worker.lease_seconds,
                                      progress=self.progress)
        if not alive and self.current is job:
            self._lost.set()

    def _run(self, job: Job, stop: threading.Event) -> None:
        try:
            task = RenderTask.model_validate(job.payload)
        except ValueError as exc:
            self._persist(job, lambda: self._store.fail(job.id, self._worker, f"unreadable job payload: {exc}",
                                                        retry_in=None))
            return
        missing = shared_state.first_unreadable(shared_state.job_files(task))
        if missing is not None:
            # Not the job's fault: another worker (host) may see the file, so leave it to them.
            self._persist(job, lambda: self._store.release_unreadable(
                job.id, self._worker, socket.gethostname(), missing, recheck_in=_RECHECK_UNREADABLE_SECONDS))
            log.warning("job %d: cannot read %s on this host; left to other workers (looking again in %.0fs)",
                        job.id, missing, _RECHECK_UNREADABLE_SECONDS)
            return

        def on_step(done: int, total: int) -> None:
            self.progress = done / total if total else None

        log.info("job %d: rendering %s prompt %d of %s (attempt %d)", job.id, task.spec.model,
                 task.target.prompt_index, task.target.checkpoint or "base model", job.attempts)
        try:
            result = self._renderer.render(task, on_step=on_step,
                                           should_stop=lambda: stop.is_set() or self._lost.is_set())
            entry = self._renderer.write(task, result, job_id=job.id)
        except RenderInterrupted:
            if self._lost.is_set():
                log.info("job %d: stopped, it was cancelled or taken over", job.id)
                return
            try:
                self._persist(job, lambda: self._store.release(job.id, self._worker, "shutdown"))
                log.info("job %d: interrupted by shutdown, returned to the queue", job.id)
            except JobStateError:
                log.info("job %d: interrupted; it was already cancelled or taken over", job.id)
            return
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            self._record_failure(job, exc)
            return
        image = Path(task.target.out_dir) / entry.image
        try:
            self._persist(job, lambda: self._store.finish(job.id, self._worker,
                                                          {"image": str(image), "seed": result.seed}))
        except JobStateError:
            # Cancelled or taken over after the render finished: the image is written either way,
            # and the outbox entry is keyed by image name, so a re-run replaces it, never doubles it.
            log.info("job %d: rendered, but no longer ours to finish", job.id)
            return
        log.info("job %d: done -> %s", job.id, image)

    def _record_failure(self, job: Job, exc: BaseException) -> None:
        decision = self._policy.decide(job.attempts, exc)
        message = f"{type(exc).__name__}: {exc}"
        retry_in = decision.delay if decision.retry else None
        try:
            final = self._persist(job, lambda: self._store.fail(job.id, self._worker, message, retry_in=retry_in))
        except JobStateError:
            log.warning("job %d: %s (it was cancelled or taken over meanwhile)", job.id, message)
            return
        if isinstance(exc, PipelineError) or final.state == JobState.QUEUED:
            log.warning("job %d: %s (%s)", job.id, message, decision.reason)
        else:
            log.exception("job %d failed: %s", job.id, message, exc_info=exc)

    def _persist(self, job: Job, write: Callable[[], Any]) -> Any:
        """Run `write` (a change to the job) until the database takes it. JobStateError still
        propagates: once the database is back, a job whose lease lapsed meanwhile is no longer ours."""
        failures = 0
        while True:
            try:
                result = write()
            except DatabaseUnavailable as exc:
                failures += 1
                if failures == 1:
                    log.warning("job %d: %s; keeping its outcome until the database is back", job.id, exc)
                time.sleep(self._reconnect.delay(failures))
                continue
            if failures:
                log.info("job %d: recorded after the database came back", job.id)
            return result
