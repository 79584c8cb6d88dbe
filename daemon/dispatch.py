"""Turns a ready file into queued jobs: the step between the inbox and the queue.

- `config.yaml` of an ai-toolkit run: read the run, then queue every complete checkpoint in it;
- `<name>_<step>.safetensors` / `<name>.safetensors` inside a run: snapshot it, queue one job
  per sample prompt;
- `*.yaml|*.yml|*.json` elsewhere: a render request;
- pickled weights (`.ckpt`, `.pt`, `.bin`, `.pth`) outside a run: refused, never opened;
- anything else: left alone, logged once.
Bad input gets `<file>.error.txt` beside it (removed again once the file is fixed) and a log
line; nothing here stops the daemon.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from previewd import outbox, snapshots
from previewd.fileio import atomic_write
from previewd.config import Config
from previewd.errors import IntakeError, PreviewdError
from previewd.intake import aitoolkit, request as requests
from previewd.intake.images import ControlImageStore
from previewd.intake.paths import PICKLED_SUFFIXES
from previewd.intake.safetensors_header import SafetensorsHeaderError, is_complete, read_header
from previewd.queue.store import JobStore
from previewd.spec import LoraSpec
from previewd.tasks import OutputTarget, RenderTask, image_name

log = logging.getLogger(__name__)

JOB_CONFIG = "config.yaml"
REQUEST_SUFFIXES = (".yaml", ".yml", ".json")
IGNORED_SUFFIXES = (".tmp", ".partial", ".part", ".error.txt", ".lock")
MAX_TEXT_INPUT_BYTES = 16 * 2**20


class NotReady(Exception):
    """The input names a file that is still being written; try again later."""


def _is_aitk_config(path: Path) -> bool:
    """An ai-toolkit job config (`job:` and `config:` at the top), not any file named config.yaml."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(65536)
    except OSError:
        return False
    keys = {line.split(":", 1)[0] for line in head.splitlines() if line and not line[0].isspace() and ":" in line}
    return {"job", "config"} <= keys


@dataclass
class IntakeOutcome:
    """What one file produced, for `previewd render`/`submit` and tests."""

    path: Path
    tasks: list[RenderTask] = field(default_factory=list)
    queued: int = 0
    duplicates: int = 0


ERROR_SUFFIX = ".error.txt"
_ERROR_HEADER = "previewd could not use this file."


def error_file(path: Path) -> Path:
    return path.with_name(path.name + ERROR_SUFFIX)


def rejected_inputs(roots: list[Path]) -> list[tuple[Path, str]]:
    """Inputs that currently carry an error file, with the reason, for `previewd status`."""
    found = []
    for root in roots:
        for marker in sorted(root.rglob(f"*{ERROR_SUFFIX}")):
            if marker.is_symlink() or not marker.is_file():
                continue
            reason = marker.read_text(errors="replace").removeprefix(_ERROR_HEADER).strip().split("\n\n")[0]
            found.append((marker.with_name(marker.name.removesuffix(ERROR_SUFFIX)), reason))
    return found


class Dispatcher:
    def __init__(self, config: Config, store: JobStore | None):
        self._config = config
        self._store = store
        self._roots = config.confinement_roots
        self._images = ControlImageStore(config.asset_dir, allowed_roots=self._roots)
        self._trusted_images = ControlImageStore(config.asset_dir, allowed_roots=[], trusted=True)
        self._reported: set[tuple[Path, str]] = set()

    # -- what the watcher should not even look at ---------------------------------------
    def ignore(self, path: Path) -> bool:
        if any(part.startswith(".") for part in path.parts[-2:]) or path.name.endswith(IGNORED_SUFFIXES):
            return True
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop or a vanished link target
            return True
        for own in (self._config.state_dir, self._config.outbox_root):
            if resolved.is_relative_to(own.resolve()):
                return True
        # `path` may be a folder being scanned or a file. Preview folders carry the outbox's lock
        # file (created before their first image); ai-toolkit's samples/ sits in its run folder.
        for folder in (path, path.parent):
            if (folder / outbox.LOCK).exists():
                return True
            if folder.name == "samples" and (folder.parent / JOB_CONFIG).is_file():
                return True
        return False

    # -- entry point: called by the watcher for each settled file -------------------------
    def handle(self, path: Path) -> bool:
        """Process `path`; False means "not ready yet, look again later"."""
        job_dir = self._owning_run(path)
        try:
            if path.suffix in REQUEST_SUFFIXES and path.stat().st_size > MAX_TEXT_INPUT_BYTES:
                raise IntakeError(path, "file", [f"(file): {path.stat().st_size} bytes is more than the "
                                                 f"{MAX_TEXT_INPUT_BYTES // 2**20} MiB a config or request may be"])
            if path.name == JOB_CONFIG and job_dir == path.parent:
                self.take_run(path)
            elif job_dir is not None:
                if path.suffix == ".safetensors":
                    return self._take_checkpoint(job_dir / JOB_CONFIG, path)
                return True  # optimizer.pt, logs, loss db...: the run's own files
            elif path.suffix in REQUEST_SUFFIXES:
                self.take_request(path)
            elif path.suffix in PICKLED_SUFFIXES:
                self._reject(path, IntakeError(path, "file", [
                    f"{path.suffix}: pickled weights are never loaded (unpickling runs arbitrary code); "
                    "convert the file to .safetensors"]))
            else:
                self._once(path, "not a training run, checkpoint or request: left alone")
        except NotReady as waiting:
            self._once(path, str(waiting))
            return False
        except IntakeError as exc:
            self._reject(Path(exc.path), exc)  # beside the file at fault, e.g. the run's config.yaml
        except OSError as exc:  # the file vanished or cannot be read: look again when it changes
            self._once(path, f"cannot read: {exc}")
        return True

    def _owning_run(self, path: Path) -> Path | None:
        """The ai-toolkit run folder that holds `path` (a parent with config.yaml), within the roots."""
        for parent in path.parents:
            if _is_aitk_config(parent / JOB_CONFIG):
                return parent
            if any(parent == root for root in self._roots):
                return None
        return None

    # -- ai-toolkit runs ------------------------------------------------------------------
    def take_run(self, config_path: Path) -> list[IntakeOutcome]:
        job = aitoolkit.read_job(config_path)
        self._clear_error(config_path)
        for warning in job.warnings:
            self._once(config_path, warning)
        outcomes = [self._queue_renders(job, None)] if self._config.output.baseline else []
        for checkpoint in sorted(job.job_dir.glob("*.safetensors")):
            if not aitoolkit.is_checkpoint(job, checkpoint):
                continue
            try:
                if is_complete(checkpoint):
                    outcomes.append(self._queue_checkpoint(job, checkpoint))
            except SafetensorsHeaderError as exc:
                self._reject(checkpoint, IntakeError(checkpoint, "checkpoint", [f"(file): {exc}"]))
        return outcomes

    def _take_checkpoint(self, config_path: Path, path: Path) -> bool:
        try:
            job = aitoolkit.read_job(config_path)
        except IntakeError as exc:
            self._reject(config_path, exc)
            return True
        if not aitoolkit.is_checkpoint(job, path):
            self._once(path, f"not a checkpoint of run {job.name!r}: left alone")
            return True
        try:
            complete = is_complete(path)
        except SafetensorsHeaderError as exc:
            self._reject(path, IntakeError(path, "checkpoint", [f"(file): {exc}"]))
            return True
        if not complete:
            self._once(path, "safetensors header does not match the file size yet: waiting")
            return False
        self._queue_checkpoint(job, path)
        self._clear_error(path)
        return True

    def _queue_checkpoint(self, job: aitoolkit.AitkJob, path: Path) -> IntakeOutcome:
        return self._queue_renders(job, path)

    def _queue_renders(self, job: aitoolkit.AitkJob, path: Path | None) -> IntakeOutcome:
        """One job per sample prompt for checkpoint `path`, or for the base model (step 0) when None."""
        snap = digest = None
        step = 0
        if path is not None:
            snap, digest = snapshots.snapshot(path, self._config.snapshot_dir)
            _header, metadata = read_header(snap)
            step = aitoolkit.checkpoint_step(job, path, metadata)
        renders = aitoolkit.specs_for_checkpoint(job, str(snap) if snap else None, parity=self._config.parity,
                                                 resolve_image=self._images.resolve, lora_sha256=digest)
        out_dir = job.job_dir / self._config.output.dirname
        if out_dir.is_symlink():
            raise IntakeError(job.config_path, "aitk-job", [
                f"{out_dir}: the previews folder is a symbolic link; previewd writes only inside the run"])
        gaps = tuple(aitoolkit.parity_gaps(job))
        name = path.name if path else None
        fmt = self._config.output.format
        tasks = [
            RenderTask(spec=spec, target=OutputTarget(
                out_dir=str(out_dir), image_name=image_name(step, name, index, fmt), title=job.name,
                source=str(job.config_path), checkpoint=name, step=step, prompt_index=index, format=fmt,
                job_dir=str(job.job_dir), parity_gaps=gaps))
            for index, spec in renders
        ]
        return self._enqueue(path or job.config_path, tasks)

    # -- requests ---------------------------------------------------------------------------
    def plan_request(self, path: Path, *, trusted: bool = False, out_dir: Path | None = None) -> list[RenderTask]:
        """Read a request into tasks (LoRA snapshotted). `trusted`: the user named it on the command line."""
        plan = requests.read_request(path, allowed_roots=[Path("/")] if trusted else self._roots,
                                     default_parity=self._config.parity,
                                     resolve_image=(self._trusted_images if trusted else self._images).resolve)
        if plan.output_dir is not None and not trusted:
            self._check_output_dir(path, plan.output_dir)
        target_dir = out_dir or plan.output_dir or (self._config.outbox_root / self._request_folder(path))
        fmt = plan.output_format or self._config.output.format
        tasks = []
        snapped: dict[str, tuple[Path, str]] = {}
        for index, spec in plan.renders:
            checkpoint = step = None
            if spec.lora is not None:
                if spec.lora.path not in snapped:
                    snapped[spec.lora.path] = self._snapshot_lora(Path(spec.lora.path))
                snap, digest = snapped[spec.lora.path]
                checkpoint = Path(spec.lora.path).name
                step = _lora_step(snap)
                spec = spec.model_copy(update={"lora": LoraSpec(path=str(snap), sha256=digest,
                                                                network_multiplier=spec.lora.network_multiplier)})
            tasks.append(RenderTask(spec=spec, target=OutputTarget(
                out_dir=str(target_dir), image_name=image_name(step, checkpoint, index, fmt), title=plan.name,
                source=str(path), checkpoint=checkpoint, step=step, prompt_index=index, format=fmt)))
        return tasks

    def _request_folder(self, path: Path) -> Path:
        """Outbox folder of a request: its path below the watch root, so equal names never collide."""
        resolved = path.resolve()
        for root in self._roots:
            if resolved.is_relative_to(root):
                return resolved.relative_to(root).with_suffix("")
        return Path(path.stem)

    def _check_output_dir(self, path: Path, out_dir: Path) -> None:
        resolved = out_dir.resolve()
        if resolved in self._roots or self._owning_run(resolved / "x") is not None:
            raise IntakeError(path, "request", [
                f"output.dir: {out_dir} is a watched folder or a training run; previews there would hide "
                "its files from previewd — name a folder of its own"])

    def _snapshot_lora(self, lora: Path) -> tuple[Path, str]:
        try:
            complete = is_complete(lora)
        except SafetensorsHeaderError as exc:
            raise IntakeError(lora, "checkpoint", [f"loras.0.path: {exc}"]) from None
        if not complete:
            raise NotReady(f"LoRA {lora} is still being written: waiting")
        return snapshots.snapshot(lora, self._config.snapshot_dir)

    def take_request(self, path: Path) -> IntakeOutcome:
        tasks = self.plan_request(path)
        self._clear_error(path)
        return self._enqueue(path, tasks)

    # -- shared -------------------------------------------------------------------------------
    def _enqueue(self, source: Path, tasks: list[RenderTask]) -> IntakeOutcome:
        outcome = IntakeOutcome(path=source, tasks=tasks)
        if self._store is None:
            return outcome
        for task in tasks:
            _job, created = self._store.enqueue(
                key=task.idempotency_key(), payload=task.model_dump(mode="json"), model=task.spec.model,
                group=task.target.out_dir, affinity=task.spec.lora.sha256 if task.spec.lora else None,
                max_attempts=self._config.worker.max_attempts)
            if created:
                outcome.queued += 1
            else:
                outcome.duplicates += 1
        log.info("%s: %d job(s) queued, %d already known", source, outcome.queued, outcome.duplicates)
        return outcome

    def _reject(self, path: Path, exc: PreviewdError) -> None:
        text = f"{_ERROR_HEADER}\n\n{exc}\n\nFix the file (or replace it) and previewd reads it again.\n"
        log.error("%s", exc)
        try:
            target = error_file(path)
            # atomic_write renames over the name, so a planted symlink is replaced, never followed.
            if target.is_symlink() or not target.exists() or target.read_text() != text:
                atomic_write(target, text.encode())
        except OSError as write_error:
            log.error("%s: cannot write the error file: %s", path, write_error)

    def _clear_error(self, path: Path) -> None:
        error_file(path).unlink(missing_ok=True)

    def _once(self, path: Path, message: str) -> None:
        if (path, message) not in self._reported:
            self._reported.add((path, message))
            log.info("%s: %s", path, message)


def _lora_step(path: Path) -> int | None:
    """The training step ai-toolkit wrote into a LoRA's header, if any (requests name any file)."""
    try:
        _header, metadata = read_header(path)
        step = json.loads(metadata.get("training_info") or "{}").get("step")
    except (SafetensorsHeaderError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


