"""The daemon's lifecycle: startup, main loop, periodic chores, clean shutdown (uvicorn style).

Signal handlers only set flags (uvicorn's two-step exit). The first SIGTERM/SIGINT asks the
running render to stop after its current step and returns the job to the queue; a second one
exits at once. The periodic chores (`on_tick`: watchdog, worker heartbeat, the running job's
lease, expired leases, gone workers, snapshot pruning) run on their own thread, so they go on while
a model loads or renders.

The database may be unreachable at start (after a reboot it may come up after us) or at any time
later (a restart, a network blip): the daemon waits and retries, never exits for it, and says so
in its systemd status. Start-up brings the queue's schema to head under the database's lock.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from types import FrameType

from sqlalchemy.engine import make_url

from previewd import database_identity, outbox, rejections, safe_files, shared_state, snapshots
from previewd.config import Config
from previewd.errors import ConfigError, shown
from previewd.dispatch import Dispatcher, affinity_checkpoint
from previewd.inbox import InboxWatcher, Outcome
from previewd.notify import notify
from previewd.queue import DatabaseUnavailable
from previewd.queue.states import JobState
from previewd.queue.store import JobStore
from previewd.retry import RetryPolicy
from previewd.worker import Renderer, Worker

log = logging.getLogger(__name__)

_TICK_SECONDS = 1.0
_SNAPSHOT_MIN_AGE = 600.0
_PRUNE_SECONDS = 300.0
# Gone workers stay listed (status shows them) this long before their rows are deleted.
_FORGET_WORKERS_SECONDS = 86400.0


class Service:
    def __init__(self, config: Config, *, exit_when_idle: bool = False, renderer: Renderer | None = None):
        self.config = config
        self.exit_when_idle = exit_when_idle
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.should_exit = threading.Event()
        self.force_exit = threading.Event()
        self._captured_signals: list[int] = []
        self._stopped = threading.Event()
        self._ticks_done = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="previewd-tick", daemon=True)
        self._store = JobStore(config.db_url)
        self._renderer = renderer or Renderer(config)
        self._dispatcher = Dispatcher(config, self._store)
        self._watcher = InboxWatcher(config.watch_roots, self._intake, ignore=self._dispatcher.ignore,
                                     settle_seconds=config.watch.settle_seconds,
                                     rescan_seconds=config.watch.rescan_seconds, polling=config.watch.polling)
        self._worker = Worker(self._store, self._renderer, config, self.worker_id)
        self._loop_backoff = RetryPolicy(base_delay=2.0, max_delay=60.0)
        self._last_prune = 0.0
        self._probe: Path | None = None
        self._watching = False
        self._db_lost_at: float | None = None
        self._db_identity: tuple[int, int] | None = None
        self._connected = False
        self._fatal: str | None = None
        """Why the daemon stopped by itself (the database file went away): it exits 1."""

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("Started previewd process [%d] as worker %s", os.getpid(), self.worker_id)
            self.startup()
            self.main_loop()
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("Finished previewd process [%d]", os.getpid())
        if self._fatal is not None:
            return 1
        if self.exit_when_idle and self._worker.failed:
            # A batch run (CI, a script) must notice renders that will never appear.
            log.error("%d job(s) failed for good while this daemon ran", self._worker.failed)
            return 1
        return 0

    def startup(self) -> None:
        for folder in (self.config.state_dir, self.config.outbox_root, self.config.inbox):
            folder.mkdir(parents=True, exist_ok=True)
        # Everything the daemon writes stays below these; rejections with no place beside their file
        # are kept in state_dir.
        safe_files.confine_outputs(self.config.output_roots)
        rejections.configure(self.config.state_dir)
        self._check_setup()
        database_identity.check_before_connect(self.config.db_url, self.config.state_dir)
        self._connect()
        if self.should_exit.is_set():
            return
        self._db_identity = database_identity.check_after_connect(self.config.db_url, self.config.state_dir)
        self._connected = True
        self._watcher.start()
        self._watching = True
        self._ticker.start()
        threading.Thread(target=self._guard_shutdown, name="previewd-shutdown-guard", daemon=True).start()
        log.info("watching %s; database %s", ", ".join(map(str, self.config.watch_roots)),
                 make_url(self.config.db_url).render_as_string(hide_password=True))
        notify("READY=1", "STATUS=watching for checkpoints")

    def _check_setup(self) -> None:
        """`previewd doctor`'s checks, logged: a missing model or an unwritable folder is said once
        at start, where the operator looks; a device the config insists on and lacks stops it here."""
        from previewd import doctor

        device = doctor.check_device(self.config)
        if not device.ok and self.config.device != "auto":
            raise ConfigError(f"device: {device.detail}")
        (log.info if device.ok else log.warning)("device %s", device.detail)
        for check in (*doctor.check_folders(self.config), *doctor.check_models(self.config)):
            if not check.ok:
                log.error("%s: %s", check.what, check.detail)

    def main_loop(self) -> None:
        failures = 0
        while not self.should_exit.is_set():
            try:
                worked = self._worker.run_once(self.should_exit)
                idle = not worked and self.exit_when_idle and self._idle()
                failures = 0
            except DatabaseUnavailable as exc:  # expected now and then: no traceback
                failures += 1
                delay = self._loop_backoff.delay(failures)
                log.warning("%s; claiming again in %.0fs", exc, delay)
                self.should_exit.wait(delay)
                continue
            except Exception:  # a bug or similar: back off and keep the daemon up
                if self._fatal is not None:  # the database went away: stopping, and said so
                    break
                failures += 1
                delay = self._loop_backoff.delay(failures)
                log.exception("main loop error; retrying in %.0fs", delay)
                self.should_exit.wait(delay)
                continue
            if worked:
                continue
            if idle:
                stalled = self._watcher.stalled()
                if stalled:
                    log.info("still waiting for %d incomplete checkpoint(s), refused after "
                             "limits.incomplete_checkpoint_minutes: %s", len(stalled),
                             ", ".join(shown(p) for p in stalled))
                log.info("queue empty and inbox settled: exiting (--exit-when-idle)")
                return
            self.should_exit.wait(self.config.worker.idle_poll_seconds)

    def on_tick(self) -> None:
        """Once a second, whatever the worker is doing."""
        gone = database_identity.still_there(self.config.db_url, self._db_identity)
        if gone is not None:
            if self._fatal is None:
                self._fatal = gone
                log.error("%s while previewd ran: stopping (its jobs and history are not in the file at that "
                          "path any more; restore it, or run `previewd db upgrade -c CONFIG` to start a new "
                          "queue)", gone)
                self.should_exit.set()
            return
        self._ping_watchdog()
        current = self._worker.current
        if not self._store.worker_heartbeat(self.worker_id, current.id if current else None,
                                            model=self._renderer.model):
            self._register()  # deleted by the others while we could not reach the database
        self._worker.beat()
        self._worker.report()
        for job in self._store.requeue_expired():
            log.warning("job %d: its worker stopped renewing the lease; now %s (%s)", job.id, job.state.value,
                        job.last_error)
        for worker in self._store.reap_workers(stale_after=self.config.worker.lease_seconds,
                                               forget_after=_FORGET_WORKERS_SECONDS):
            log.warning("worker %s on %s (%s) stopped heartbeating: marked gone", worker.id, worker.hostname,
                        worker.device or "device unknown")
            shared_state.remove_probe(worker.probe)
        now = time.monotonic()
        if now - self._last_prune < _PRUNE_SECONDS:
            return
        self._last_prune = now
        # Failed and cancelled jobs can be retried, so their checkpoints stay too.
        keep = {affinity_checkpoint(job.affinity) for job in self._store.list_jobs(
            states=[JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.CANCELLED]) if job.affinity}
        # Snapshot ages by the file server's clock: this host's may be off.
        snapshots.prune(self.config.snapshot_dir, keep, min_age_seconds=_SNAPSHOT_MIN_AGE,
                        now=shared_state.filesystem_now(self.config.snapshot_dir))

    def shutdown(self) -> None:
        notify("STOPPING=1")
        self.should_exit.set()
        self._ticks_done.set()
        if self._ticker.is_alive():
            self._ticker.join()
        if self._watching:  # not when start-up failed, e.g. on a database of a newer previewd
            self._watcher.stop()
        self._renderer.close()
        outbox.flush()  # the manifest, grid and page of the last renders
        try:
            # Not into a database that is not ours, nor after a start-up that never connected.
            if self._fatal is None and self._connected:
                self._store.unregister_worker(self.worker_id)
        except DatabaseUnavailable as exc:
            log.warning("%s: the other workers mark this one gone after its lease", exc)
        shared_state.remove_probe(str(self._probe) if self._probe else None)
        self._store.close()
        safe_files.confine_outputs(None)
        rejections.configure(None)
        self._stopped.set()

    # -- helpers ------------------------------------------------------------------------------
    def _connect(self) -> None:
        """Wait for the database, bring the schema to head (under the database's lock, so daemons
        starting together migrate once), register, and check that this host sees the shared state."""
        failures = 0
        while True:
            try:
                found, head = self._store.upgrade_schema()
                self._register()
                for job in self._store.requeue_expired():
                    log.warning("job %d: its worker vanished; now %s", job.id, job.state.value)
                peers = self._store.workers()
                break
            except DatabaseUnavailable as exc:
                failures += 1
                delay = self._loop_backoff.delay(failures)
                log.warning("%s; trying again in %.0fs", exc, delay)
                # Under systemd, start-up may wait as long as the database does.
                notify(f"STATUS=waiting for the database ({exc})", f"EXTEND_TIMEOUT_USEC={int((delay + 60) * 1e6)}")
                if self.should_exit.wait(delay):
                    return
        if found == head:
            log.info("queue schema at %s (head)", head)
        else:
            log.info("queue schema upgraded from %s to %s", found or "nothing", head)
        for problem in shared_state.check_peers(peers, self.worker_id):
            log.error("shared state: %s", problem)

    def _register(self) -> None:
        self._probe = shared_state.write_probe(self.config.snapshot_dir, self.worker_id)
        self._store.register_worker(self.worker_id, socket.gethostname(), os.getpid(),
                                    device=self.config.device, probe=str(self._probe))

    def _intake(self, path: Path) -> Outcome:
        if self._fatal is not None:  # stopping: nothing more goes into a database that is not ours
            return Outcome.RETRY
        try:
            return self._dispatcher.handle(path)
        except DatabaseUnavailable as exc:  # not handled: the watcher delivers it again later
            log.warning("%s: %s; reading it again later", shown(path), exc)
            return Outcome.RETRY

    def _tick_loop(self) -> None:
        while not self._ticks_done.wait(_TICK_SECONDS):
            try:
                self.on_tick()
            except DatabaseUnavailable as exc:  # the render goes on; chores resume when it is back
                if self._db_lost_at is None:
                    self._db_lost_at = time.monotonic()
                    log.warning("%s; rendering goes on, retrying every %.0fs", exc, _TICK_SECONDS)
                continue
            except Exception:  # e.g. a bug in a chore: try again next tick
                log.exception("periodic chores failed; retrying")
                continue
            if self._db_lost_at is not None:
                log.info("database reachable again after %.0fs", time.monotonic() - self._db_lost_at)
                self._db_lost_at = None

    def _idle(self) -> bool:
        # Jobs whose files this host cannot read are left to the others.
        return self._watcher.idle and self._store.outstanding(self.worker_id) == 0

    def _ping_watchdog(self) -> None:
        current = self._worker.current
        status = f"rendering job {current.id}; " if current else "idle; "
        try:
            counts = self._store.counts()
        except DatabaseUnavailable:  # the watchdog is about this process, which is fine
            status += "database unreachable"
        else:
            status += f"{counts.get(JobState.QUEUED, 0)} queued, {counts.get(JobState.DONE, 0)} done, " \
                f"{counts.get(JobState.FAILED, 0)} failed"
        notify("WATCHDOG=1", f"STATUS={status}")

    def _guard_shutdown(self) -> None:
        """Acts on the flags the signal handler sets. A stop request waits for the current diffusion
        step; a model load or a hung device call cannot be interrupted, so past the time limit, or
        on a second signal, the process exits and the job goes back to the queue (or its lease
        lapses and another start takes it up again)."""
        self.should_exit.wait()
        if self._stopped.is_set():
            return
        if self._captured_signals:
            name = signal.Signals(self._captured_signals[0]).name
            log.info("%s: finishing the current step (send it again to quit at once)", name)
        forced = self.force_exit.wait(self.config.worker.shutdown_timeout_seconds)
        if self._stopped.is_set():
            return
        current = self._worker.current
        reason = "a second signal" if forced else \
            f"still busy {self.config.worker.shutdown_timeout_seconds:.0f}s after the stop request"
        log.error("%s: exiting now%s", reason, f"; job {current.id} goes back to the queue" if current else "")
        if current is not None:
            try:
                self._store.release(current.id, self.worker_id, "stopped while busy")
            except DatabaseUnavailable as exc:  # its lease expires instead
                log.warning("job %d: could not return it to the queue (%s)", current.id, exc)
            except Exception:  # its lease expires instead
                log.exception("job %d: could not return it to the queue", current.id)
        os._exit(128 + self._captured_signals[-1] if forced else 1)

    def _handle_exit(self, signum: int, frame: FrameType | None) -> None:
        # Only flags here: logging or exiting inside a signal handler is not safe.
        self._captured_signals.append(signum)
        if self.should_exit.is_set():
            self.force_exit.set()
        self.should_exit.set()
