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

from previewd import outbox, rejections, shared_state
from previewd.config import Config
from previewd.dispatch import lora_affinity
from previewd.errors import (JobStateError, LoraError, OutboxError, PipelineError, PipelineOutOfMemory,
                             RenderInterrupted)
from previewd.logs import still_busy
from previewd.manifest import ControlRef, RenderEntry
from previewd.pipelines.quantization import Quantization
from previewd.queue import DatabaseUnavailable, Job, JobState, JobStore
from previewd.retry import RetryPolicy
from previewd.spec import ModelSource, RenderResult
from previewd.tasks import RenderTask

log = logging.getLogger(__name__)

# A worker that cannot read a job's files skips the job this long before it looks again.
_RECHECK_UNREADABLE_SECONDS = 300.0

# How often a wait for device memory checks for a stop request (seconds).
_STOP_CHECK_SECONDS = 0.1

_VERSIONED = ("previewd", "torch", "diffusers", "transformers", "peft", "optimum-quanto")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _ignore(_phase: str) -> None:
    """No one is listening for phases (`previewd render`)."""


class Renderer:
    """Keeps one pipeline loaded; swaps models only when a task needs another one.

    Before a load it asks the pipeline for its memory plan (previewd.pipelines.memory) and waits
    until the device has the plan's bytes free: training shares the GPU. The wait stops as soon as
    the render's `should_stop` says so. After `memory.idle_release_minutes` without a render the
    pipeline is unloaded (`release_if_idle`).
    """

    def __init__(self, config: Config, factory: Callable[..., Any] | None = None):
        self._config = config
        self._factory = factory
        self._pipeline = None
        self._source: ModelSource | None = None
        self._quantization: Quantization | None = None
        self.model: str | None = None
        self.affinity: str | None = None
        """The loaded (checkpoint, multiplier) as the queue's affinity (dispatch.lora_affinity)."""
        self.plan = None
        self._last_used = time.monotonic()
        self._versions = library_versions()

    def _get(self, task: RenderTask, should_stop: Callable[[], bool] | None, on_phase: Callable[[str], None]):
        spec = task.spec
        source = self._config.model_source(spec.model, spec.base)
        # One quantised base per (model, quantisation): a run's checkpoints all reuse it.
        quantization = Quantization.of(spec, source)
        if (self.model == spec.model and self._source == source and self._quantization == quantization
                and self._pipeline is not None):
            on_phase("encoding prompts")
            return self._pipeline
        self.close()
        factory = self._factory
        if factory is None:
            from previewd import pipelines
            from previewd.pipelines.model_sources import verify_source

            # A missing model is a setup problem with one clear line, not a load that fails later.
            verify_source(spec.model, source)
            factory = pipelines.create
        pipeline = factory(spec.model, source, device=self._config.device, dtype=self._config.dtype,
                           quantization=quantization)
        device = str(getattr(pipeline, "device", "cpu"))
        plan = self._plan(pipeline, spec)
        self._wait_for_memory(device, plan.peak_bytes if plan is not None else 0, should_stop)
        on_phase("loading model")
        started = time.monotonic()
        with still_busy(log, f"loading {spec.model} from {source.path}"):
            pipeline.load()
        log.info("loaded %s from %s in %.1fs", spec.model, source.path, time.monotonic() - started)
        self._pipeline, self.model, self._source, self.plan = pipeline, spec.model, source, plan
        self._quantization = quantization
        on_phase("encoding prompts")
        return pipeline

    def _plan(self, pipeline, spec):
        """The pipeline's memory plan (stand-in pipelines without one have none), logged."""
        plan_memory = getattr(pipeline, "plan_memory", None)
        if plan_memory is None:
            return None
        try:
            plan = plan_memory(self._config.memory, spec.lora.path if spec.lora else None)
        except Exception:  # noqa: BLE001 - a plan is advice: without one the model loads as configured
            log.exception("%s: no memory plan; loading it whole onto %s", spec.model, self._config.device)
            return None
        log.log(logging.INFO if plan.fits else logging.WARNING, "memory plan: %s", plan.summary())
        return plan

    def _wait_for_memory(self, device: str, planned: int, should_stop: Callable[[], bool] | None) -> None:
        """Training shares the GPU: wait until the plan's bytes (and at least worker.min_free_vram_gb)
        are free. Logs when the free amount changes, not every poll; RenderInterrupted on a stop."""
        wanted = max(planned, int(self._config.worker.min_free_vram_gb * 2**30))
        if wanted <= 0 or not device.startswith("cuda"):
            return
        from previewd.pipelines import device as devices

        reported = None
        while (free := devices.free_bytes(device)) is not None and free < wanted:
            shown = round(free / 2**30, 1)
            if shown != reported:
                log.info("waiting for %.1f GiB free on %s (%.1f GiB free)", wanted / 2**30, device, shown)
                reported = shown
            deadline = time.monotonic() + self._config.worker.idle_poll_seconds
            while time.monotonic() < deadline:
                if should_stop is not None and should_stop():
                    raise RenderInterrupted(f"stopped while waiting for {wanted / 2**30:.1f} GiB on {device}")
                time.sleep(min(_STOP_CHECK_SECONDS, max(0.0, deadline - time.monotonic())))
        if reported is not None:
            log.info("%.1f GiB free on %s: loading", free / 2**30, device)

    def release_if_idle(self) -> bool:
        """Unload the pipeline after memory.idle_release_minutes without a render; True if it did."""
        minutes = self._config.memory.idle_release_minutes
        if self._pipeline is None or minutes <= 0 or time.monotonic() - self._last_used < minutes * 60:
            return False
        log.info("%s idle for %.0f min: unloading it to give the memory back", self.model, minutes)
        self.close()
        return True

    def render(self, task: RenderTask, *, on_step=None, should_stop=None, on_phase=None) -> RenderResult:
        """`on_phase(name)` hears "loading model" and "encoding prompts"; denoising and decoding
        follow from `on_step`."""
        try:
            result = self._get(task, should_stop, on_phase or _ignore).render(
                task.spec, on_step=on_step, should_stop=should_stop)
        except PipelineOutOfMemory as exc:
            message = str(exc)
        else:
            self.affinity = lora_affinity(task.spec)
            return result
        finally:
            self._last_used = time.monotonic()
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
        # The manifest, grid and page follow on the outbox's own thread, off the render path.
        return outbox.write_render(target, result.image, entry, options=outbox.Options.of(self._config.output))

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.unload()
        self._pipeline, self._source, self.model, self.affinity, self.plan = None, None, None, None, None


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
        self._phase: tuple[str, int | None, int | None] | None = None
        self._reported: tuple[str, int | None, int | None] | None = None
        self.failed = 0
        """Jobs this worker failed for good (no retry left)."""
        self._lost = threading.Event()
        self._last_renewal = 0.0
        self._reconnect = RetryPolicy(base_delay=1.0, max_delay=15.0)

    def run_once(self, stop: threading.Event) -> bool:
        """Claim and run one job. False when there was nothing to do."""
        job = self._store.claim(self._worker, lease_seconds=self._config.worker.lease_seconds,
                                prefer_model=self._renderer.model, prefer_affinity=self._renderer.affinity)
        if job is None:
            self._renderer.release_if_idle()
            return False
        self._lost.clear()
        self.progress = None
        self._phase = self._reported = None
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

    def report(self) -> None:
        """Write the running job's phase and denoising step if they changed; called once a second
        from the tick thread, so a fast denoising loop costs one write a second."""
        job, phase = self.current, self._phase
        if job is None or phase is None or phase == self._reported:
            return
        self._reported = phase
        name, step, steps = phase
        self._store.report_progress(job.id, self._worker, phase=name, step=step, steps=steps)

    def _set_phase(self, name: str, step: int | None = None, steps: int | None = None) -> None:
        changed = self._phase is None or self._phase[0] != name
        self._phase = (name, step, steps)
        if changed and self.current is not None:
            # A new phase is written at once, so a short one is seen too; a lost write is retried by report().
            try:
                self.report()
            except Exception:  # noqa: BLE001 - progress is a courtesy: never fail a render over it
                self._reported = None

    def _run(self, job: Job, stop: threading.Event) -> None:
        try:
            task = RenderTask.model_validate(job.payload)
        except ValueError as exc:
            error = f"unreadable job payload: {exc}"
            self._persist(job, lambda: self._store.fail(job.id, self._worker, error, retry_in=None))
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
            self._set_phase("denoising" if done < total else "decoding", done, total)

        log.info("job %d: rendering %s prompt %d of %s (attempt %d)", job.id, task.spec.model,
                 task.target.prompt_index, task.target.checkpoint or "base model", job.attempts)
        try:
            result = self._renderer.render(task, on_step=on_step, on_phase=self._set_phase,
                                           should_stop=lambda: stop.is_set() or self._lost.is_set())
            self._set_phase("writing")
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
            self._record_failure(job, exc, Path(task.target.out_dir), task)
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
        rejections.clear(Path(task.target.out_dir))  # whatever stopped this folder's renders is fixed

    def _record_failure(self, job: Job, exc: BaseException, out_dir: Path | None = None,
                        task: RenderTask | None = None) -> None:
        """Fail or retry the job; a final failure is also written beside its output folder, where
        the person training looks, since no image will appear there."""
        decision = self._policy.decide(job.attempts, exc)
        message = f"{type(exc).__name__}: {exc}"
        retry_in = decision.delay if decision.retry else None
        try:
            final = self._persist(job, lambda: self._store.fail(job.id, self._worker, message, retry_in=retry_in))
        except JobStateError:
            log.warning("job %d: %s (it was cancelled or taken over meanwhile)", job.id, message)
            return
        # An output folder previewd will not write into is said in a line, like a render that failed.
        if isinstance(exc, (PipelineError, OutboxError)) or final.state == JobState.QUEUED:
            log.warning("job %d: %s (%s)", job.id, message, decision.reason)
        else:
            log.exception("job %d failed: %s", job.id, message, exc_info=exc)
        if final.state == JobState.FAILED:
            self.failed += 1
            if out_dir is not None:
                rejections.record(out_dir, f"job {job.id} failed: {exc}")
            if isinstance(exc, LoraError) and task is not None:  # beside the file to fix, too
                rejections.lora_failed(task, str(exc))
            if task is not None:  # the page and grid show the cell's reason
                outbox.record_cell(task, job_id=job.id, error=message, options=outbox.Options.of(self._config.output))

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

