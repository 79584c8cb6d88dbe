"""Intake as planning: a ready file -> the render tasks it implies. Reads, never writes.

`Planner.plan(path)` routes a file the watcher delivered:
- `config.yaml` of an ai-toolkit run: every complete checkpoint in it (and the base model when
  `output.baseline` is on);
- `<name>_<step>.safetensors` / `<name>.safetensors` inside a run: one task per sample prompt;
- `*.yaml|*.yml|*.json` elsewhere: a render request;
- pickled weights (`.ckpt`, `.pt`, `.bin`, ...) outside a run: refused, never opened;
- anything else: left alone, with a note.
The result is a `Plan`: tasks whose LoRA still names the original file (the dispatcher snapshots
it and records the content hash), control images to store, inputs to reject or clear, notes to
log. Nothing here touches the queue or writes a file, so `previewd render` and tests use it as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from previewd.config import Config
from previewd.errors import IntakeError, NotReady
from previewd.intake import aitoolkit, request as requests
from previewd.intake.controls import ResolveImage
from previewd.intake.images import ControlImageStore, StoredImage
from previewd.intake.paths import PICKLED_SUFFIXES
from previewd.intake.safetensors_header import SafetensorsHeaderError, is_complete, read_header
from previewd.tasks import OutputTarget, RenderTask, image_name

JOB_CONFIG = "config.yaml"
REQUEST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_TEXT_INPUT_BYTES = 16 * 2**20


@dataclass
class Plan:
    """What one ready file implies."""

    source: Path
    tasks: list[RenderTask] = field(default_factory=list)
    """LoRAs name the original file (sha256 None) until the dispatcher snapshots them."""
    assets: dict[Path, bytes] = field(default_factory=dict)
    """Control images to write into the content-addressed store before the tasks are queued."""
    rejected: list[IntakeError] = field(default_factory=list)
    """Inputs previewd will not use: each gets an error file beside `error.path`."""
    accepted: list[Path] = field(default_factory=list)
    """Inputs read without a problem: any earlier error file of theirs is stale."""
    notes: list[str] = field(default_factory=list)
    """Said once in the log (ignored files, warnings, why the file must wait)."""
    ready: bool = True
    """False: a file it names is still being written; deliver it again later."""


class Planner:
    def __init__(self, config: Config):
        self._config = config
        self._roots = config.confinement_roots
        self._images = ControlImageStore(config.asset_dir, allowed_roots=self._roots)
        self._trusted_images = ControlImageStore(config.asset_dir, allowed_roots=[], trusted=True)

    # -- routing ----------------------------------------------------------------------------
    def plan(self, path: Path) -> Plan:
        """The plan for a file the watcher found settled."""
        plan = Plan(source=path)
        try:
            self._route(path, plan)
        except NotReady as waiting:
            plan.tasks.clear()
            plan.ready = False
            plan.notes.append(str(waiting))
        except IntakeError as exc:
            plan.tasks.clear()
            plan.rejected.append(exc)  # beside the file at fault, e.g. the run's config.yaml
        except OSError as exc:  # vanished or unreadable: it is seen again when it changes
            plan.tasks.clear()
            plan.notes.append(f"cannot read: {exc}")
        return plan

    def _route(self, path: Path, plan: Plan) -> None:
        run_dir = self.owning_run(path)
        if path.suffix in REQUEST_SUFFIXES and path.stat().st_size > MAX_TEXT_INPUT_BYTES:
            raise IntakeError(path, "file", [f"(file): {path.stat().st_size} bytes is more than the "
                                             f"{MAX_TEXT_INPUT_BYTES // 2**20} MiB a config or request may be"])
        if path.name == JOB_CONFIG and run_dir == path.parent:
            self._plan_run(path, plan)
        elif run_dir is not None:
            if path.suffix == ".safetensors":
                self._plan_checkpoint(run_dir / JOB_CONFIG, path, plan)
            # else: optimizer.pt, logs, loss db...: the run's own files
        elif path.suffix in REQUEST_SUFFIXES:
            self._plan_request(path, plan, trusted=False, out_dir=None)
        elif path.suffix in PICKLED_SUFFIXES:
            raise IntakeError(path, "file", [
                f"{path.suffix}: pickled weights are never loaded (unpickling runs arbitrary code); "
                "convert the file to .safetensors"])
        else:
            plan.notes.append("not a training run, checkpoint or request: left alone")

    def owning_run(self, path: Path) -> Path | None:
        """The ai-toolkit run folder that holds `path` (a parent with its config.yaml), within the roots."""
        for parent in path.parents:
            if aitoolkit.is_job_config(parent / JOB_CONFIG):
                return parent
            if any(parent == root for root in self._roots):
                return None
        return None

    # -- ai-toolkit runs ---------------------------------------------------------------------
    def _plan_run(self, config_path: Path, plan: Plan) -> None:
        job = aitoolkit.read_job(config_path, aitk_root=self._config.aitk_root)
        plan.accepted.append(config_path)
        plan.notes.extend(job.warnings)
        if self._config.output.baseline:
            self._add_renders(job, None, plan)
        for checkpoint in sorted(job.job_dir.glob("*.safetensors")):
            if not aitoolkit.is_checkpoint(job, checkpoint):
                continue
            try:
                if is_complete(checkpoint):
                    self._add_renders(job, checkpoint, plan)
            except SafetensorsHeaderError as exc:
                plan.rejected.append(IntakeError(checkpoint, "checkpoint", [f"(file): {exc}"]))

    def _plan_checkpoint(self, config_path: Path, path: Path, plan: Plan) -> None:
        job = aitoolkit.read_job(config_path, aitk_root=self._config.aitk_root)
        if not aitoolkit.is_checkpoint(job, path):
            plan.notes.append(f"not a checkpoint of run {job.name!r}: left alone")
            return
        try:
            complete = is_complete(path)
        except SafetensorsHeaderError as exc:
            raise IntakeError(path, "checkpoint", [f"(file): {exc}"]) from None
        if not complete:
            raise NotReady("safetensors header does not match the file size yet: waiting")
        self._add_renders(job, path, plan)
        plan.accepted.append(path)

    def _add_renders(self, job: aitoolkit.AitkJob, checkpoint: Path | None, plan: Plan) -> None:
        """One task per sample prompt for `checkpoint`, or for the base model (step 0) when None."""
        step = 0
        if checkpoint is not None:
            _header, metadata = read_header(checkpoint)
            step = aitoolkit.checkpoint_step(job, checkpoint, metadata)
        renders = aitoolkit.specs_for_checkpoint(job, str(checkpoint) if checkpoint else None,
                                                 parity=self._config.parity,
                                                 resolve_image=self._collect(self._images, plan))
        out_dir = job.job_dir / self._config.output.dirname
        if out_dir.is_symlink():
            raise IntakeError(job.config_path, "aitk-job", [
                f"{out_dir}: the previews folder is a symbolic link; previewd writes only inside the run"])
        gaps = tuple(aitoolkit.parity_gaps(job))
        name = checkpoint.name if checkpoint else None
        fmt = self._config.output.format
        plan.tasks.extend(
            RenderTask(spec=spec, target=OutputTarget(
                out_dir=str(out_dir), image_name=image_name(step, name, index, fmt), title=job.name,
                source=str(job.config_path), checkpoint=name, step=step, prompt_index=index, format=fmt,
                job_dir=str(job.job_dir), parity_gaps=gaps))
            for index, spec in renders)

    # -- requests ----------------------------------------------------------------------------
    def plan_request(self, path: Path, *, trusted: bool = False, out_dir: Path | None = None) -> Plan:
        """A request file's plan. `trusted`: its user named it on the command line, so the files it
        names may lie anywhere on this machine."""
        plan = Plan(source=path)
        self._plan_request(path, plan, trusted=trusted, out_dir=out_dir)
        return plan

    def _plan_request(self, path: Path, plan: Plan, *, trusted: bool, out_dir: Path | None) -> None:
        read = requests.read_request(path, allowed_roots=[Path("/")] if trusted else self._roots,
                                     default_parity=self._config.parity,
                                     resolve_image=self._collect(
                                         self._trusted_images if trusted else self._images, plan))
        if read.output_dir is not None and not trusted:
            self._check_output_dir(path, read.output_dir)
        target_dir = out_dir or read.output_dir or (self._config.outbox_root / self._request_folder(path))
        fmt = read.output_format or self._config.output.format
        loras = dict.fromkeys(spec.lora.path for _index, spec in read.renders if spec.lora is not None)
        steps = {lora: _lora_step(_complete_lora(Path(lora), f"loras.{n}.path")) for n, lora in enumerate(loras)}
        # LoRAs of different runs may share a step: their images are then named after their files.
        by_name = len(set(steps.values())) < len(steps)
        for index, spec in read.renders:
            checkpoint = step = None
            if spec.lora is not None:
                checkpoint, step = Path(spec.lora.path).name, steps[spec.lora.path]
            strength = spec.lora.network_multiplier if spec.lora is not None and "strength" in read.swept else None
            seed = spec.seed if "seed" in read.swept else None
            name = image_name(step, checkpoint, index, fmt, by_name=by_name, strength=strength, seed=seed)
            plan.tasks.append(RenderTask(spec=spec, target=OutputTarget(
                out_dir=str(target_dir), image_name=name, title=read.name, source=str(path), checkpoint=checkpoint,
                step=step, prompt_index=index, format=fmt, strength=strength, seed=seed)))
        plan.notes.extend(read.warnings)
        plan.accepted.append(path)

    def _request_folder(self, path: Path) -> Path:
        """Outbox folder of a request: its path below the watch root, so equal names never collide."""
        resolved = path.resolve()
        for root in self._roots:
            if resolved.is_relative_to(root):
                return resolved.relative_to(root).with_suffix("")
        return Path(path.stem)

    def _check_output_dir(self, path: Path, out_dir: Path) -> None:
        resolved = out_dir.resolve()
        if resolved in self._roots or self.owning_run(resolved / "x") is not None:
            raise IntakeError(path, "request", [
                f"output.dir: {out_dir} is a watched folder or a training run; previews there would hide "
                "its files from previewd — name a folder of its own"])

    # -- shared ------------------------------------------------------------------------------
    @staticmethod
    def _collect(store: ControlImageStore, plan: Plan) -> ResolveImage:
        """A resolver that verifies each control image and leaves its writing to the plan's owner."""

        def resolve(source: str, base_dir: Path, where: str) -> StoredImage:
            image, data = store.fetch(source, base_dir, where)
            plan.assets[Path(image.path)] = data
            return image

        return resolve


def _complete_lora(lora: Path, where: str) -> Path:
    try:
        complete = is_complete(lora)
    except SafetensorsHeaderError as exc:
        raise IntakeError(lora, "checkpoint", [f"{where}: {exc}"]) from None
    if not complete:
        raise NotReady(f"LoRA {lora} is still being written: waiting")
    return lora


def _lora_step(path: Path) -> int | None:
    """The training step ai-toolkit wrote into a LoRA's header, if any (requests name any file)."""
    try:
        _header, metadata = read_header(path)
        step = json.loads(metadata.get("training_info") or "{}").get("step")
    except (SafetensorsHeaderError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
