"""Intake as planning: a ready file -> the render tasks it implies. Reads, never writes.

`Planner.plan(path)` routes a file the watcher delivered:
- a name that is not UTF-8, or a symbolic link leading out of the roots: refused, whatever else
  it is (every file a dropped file leads to is opened through previewd.safe_files);
- `config.yaml` of an ai-toolkit run: every complete checkpoint in it (and the base model when
  `output.baseline` is on); directly in a watched folder: refused;
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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from previewd.config import Config
from previewd.errors import ControlImageError, IntakeError, NotReady
from previewd.intake import aitoolkit, request as requests
from previewd.intake.controls import ResolveImage
from previewd.intake.images import ControlImageStore, StoredImage
from previewd.intake.paths import PICKLED_SUFFIXES
from previewd.intake.safetensors_header import (CorruptSafetensors, Header, TruncatedSafetensors, inspect,
                                                lora_problems)
from previewd.intake.urls import UrlFetcher, UrlPending
from previewd.safe_files import RefusedFile, Roots, why_unreadable
from previewd.tasks import OutputTarget, RenderTask, image_name

JOB_CONFIG = "config.yaml"
REQUEST_SUFFIXES = (".yaml", ".yml", ".json")


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
    """False: a file it names is still being written (or downloaded); deliver it again later."""
    settled: bool = False
    """Not ready, but only time changes that (see NotReady.settled)."""
    request: bool = False
    """A request: all or nothing, so a checkpoint it names that cannot be kept rejects it too."""
    waiting: list[str] = field(default_factory=list)
    """URLs being downloaded for it."""


class _Unusable(Exception):
    """A checkpoint previewd will not use; `problems` say why."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class Planner:
    def __init__(self, config: Config):
        self._config = config
        self._limits = config.limits
        self._roots = config.confinement_roots
        self._reader_roots = Roots(self._roots)
        # A run folder lies below a watched folder, never is one (a config there would claim every file).
        self._stops = {*self._roots, *(Path(os.path.abspath(r)) for r in config.watch_roots)}
        urls = config.urls
        self._fetcher = (UrlFetcher(urls.allow_hosts, timeout=urls.timeout_seconds,
                                    max_bytes=self._limits.nbytes("image_mb")) if urls.allow_hosts else None)
        sizes = {"max_bytes": self._limits.nbytes("image_mb"),
                 "max_pixels": int(self._limits.image_megapixels * 1e6), "fetcher": self._fetcher}
        self._images = ControlImageStore(config.asset_dir, allowed_roots=self._roots, wait_for_urls=False, **sizes)
        self._trusted_images = ControlImageStore(config.asset_dir, allowed_roots=[], trusted=True, **sizes)

    # -- routing ----------------------------------------------------------------------------
    def plan(self, path: Path) -> Plan:
        """The plan for a file the watcher found settled."""
        plan = Plan(source=path)
        try:
            self._route(path, plan)
        except NotReady as waiting:
            plan.tasks.clear()
            plan.ready = False
            plan.settled = waiting.settled
            plan.notes.append(str(waiting))
        except IntakeError as exc:
            plan.tasks.clear()
            plan.accepted.clear()  # a run's config read fine, but a checkpoint's renders of it did not
            if plan.waiting:  # its problems may be the downloads still running: read it again after
                plan.ready = False
                plan.notes.append(f"waiting for {len(plan.waiting)} control image URL(s)")
            else:
                plan.rejected.append(exc)  # beside the file at fault, e.g. the run's config.yaml
        except RefusedFile as exc:
            plan.tasks.clear()
            plan.rejected.append(IntakeError(exc.path, "file", [f"(file): {exc.reason}"]))
        except (FileNotFoundError, NotADirectoryError) as exc:  # vanished: it is seen again if it returns
            plan.tasks.clear()
            plan.notes.append(f"cannot read: {exc.strerror}")
        except OSError as exc:  # e.g. not readable by previewd's user: say so beside it
            plan.tasks.clear()
            plan.rejected.append(IntakeError(path, "file", [f"(file): cannot read: {why_unreadable(exc)}"]))
        return plan

    def _route(self, path: Path, plan: Plan) -> None:
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            raise IntakeError(path, "file", ["(file name): not valid UTF-8 (shown with \\xNN escapes); rename the "
                                             "file"]) from None
        if os.path.islink(path) and not self._reader_roots.within(os.path.realpath(path)):
            # Whatever its name: a link out of the roots is never followed, and that is said beside it.
            raise RefusedFile(path, "a symbolic link that leads out of the watched and allowed folders; not followed")
        run_dir = self.owning_run(path)
        if path.name == JOB_CONFIG and run_dir is None and Path(os.path.abspath(path.parent)) in self._stops \
                and self._is_job_config(path):
            raise IntakeError(path, "aitk-job", [
                "(place): an ai-toolkit run config directly in a watched folder would make every file there part "
                "of the run; move the run into a folder of its own"])
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
        """The ai-toolkit run folder that holds `path` (a parent with its config.yaml), below a root."""
        for parent in path.parents:
            if parent in self._stops or Path(os.path.abspath(parent)) in self._stops:
                return None
            if self._is_job_config(parent / JOB_CONFIG):
                return parent
        return None

    def _is_job_config(self, path: Path) -> bool:
        return aitoolkit.is_job_config(path, roots=tuple(self._roots), limits=self._limits)

    def _read_job(self, config_path: Path) -> aitoolkit.AitkJob:
        job = aitoolkit.read_job(config_path, aitk_root=self._config.aitk_root, roots=tuple(self._roots),
                                 limits=self._limits)
        self._check_prompts(config_path, aitoolkit.KIND,
                            [(s.where, s.prompt, s.neg) for s in job.samples])
        return job

    def _check_prompts(self, source: Path, kind: str, prompts: list[tuple[str, str, str]]) -> None:
        """Refuse more prompts, or longer ones, than limits allow (each becomes jobs, tiles, text)."""
        limits, problems = self._limits, []
        if len(prompts) > limits.prompts_per_file:
            problems.append(f"(prompts): {len(prompts)} prompts; at most {limits.prompts_per_file} per file "
                            f"(limits.prompts_per_file)")
        for where, prompt, neg in prompts:
            for name, text in (("prompt", prompt), ("neg", neg)):
                if len(text) > limits.prompt_chars:
                    problems.append(f"{where}.{name}: {len(text)} characters; at most {limits.prompt_chars} "
                                    f"(limits.prompt_chars)")
        if problems:
            raise IntakeError(source, kind, problems)

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, path: Path) -> Header:
        """A complete checkpoint's checked header. Raises NotReady while it is incomplete (settled:
        only time changes that), _Unusable when previewd will not use it."""
        try:
            header = inspect(path, roots=self._reader_roots, limits=self._limits)
        except TruncatedSafetensors as exc:
            self._wait_or_refuse(path, str(exc))
        except CorruptSafetensors as exc:
            raise _Unusable([str(exc)]) from None
        except RefusedFile as exc:
            raise _Unusable([exc.reason]) from None
        if not header.complete:
            self._wait_or_refuse(path, f"{header.size} of the {header.expected_size} bytes its header says")
        problems = lora_problems(header.tensors)
        if problems:
            raise _Unusable(problems)
        return header

    def _wait_or_refuse(self, path: Path, state: str) -> None:
        minutes = self._limits.incomplete_checkpoint_minutes
        idle = (time.time() - path.stat().st_mtime) / 60
        if idle >= minutes:
            raise _Unusable([f"incomplete ({state}) and unchanged for {idle:.0f} minutes "
                             f"(limits.incomplete_checkpoint_minutes: {minutes:g})"])
        raise NotReady(f"incomplete checkpoint {path.name} ({state}): waiting", settled=True)

    # -- ai-toolkit runs ---------------------------------------------------------------------
    def _plan_run(self, config_path: Path, plan: Plan) -> None:
        job = self._read_job(config_path)
        plan.accepted.append(config_path)
        plan.notes.extend(job.warnings)
        if self._config.output.baseline:
            self._add_renders(job, None, None, plan)
        for checkpoint in sorted(job.job_dir.glob("*.safetensors")):
            if not aitoolkit.is_checkpoint(job, checkpoint):
                continue
            try:
                self._add_renders(job, checkpoint, self.checkpoint(checkpoint), plan)
            except NotReady:
                continue  # the checkpoint's own delivery waits for it
            except _Unusable as exc:
                plan.rejected.append(IntakeError(checkpoint, "checkpoint", [f"(file): {p}" for p in exc.problems]))

    def _plan_checkpoint(self, config_path: Path, path: Path, plan: Plan) -> None:
        job = self._read_job(config_path)
        if not aitoolkit.is_checkpoint(job, path):
            plan.notes.append(f"not a checkpoint of run {job.name!r}: left alone")
            return
        try:
            header = self.checkpoint(path)
        except _Unusable as exc:
            raise IntakeError(path, "checkpoint", [f"(file): {p}" for p in exc.problems]) from None
        self._add_renders(job, path, header, plan)
        plan.accepted.append(path)

    def _add_renders(self, job: aitoolkit.AitkJob, checkpoint: Path | None, header: Header | None,
                     plan: Plan) -> None:
        """One task per sample prompt for `checkpoint`, or for the base model (step 0) when None."""
        step = 0
        if checkpoint is not None:
            step = aitoolkit.checkpoint_step(job, checkpoint, header.metadata if header else None)
        renders = aitoolkit.specs_for_checkpoint(job, str(checkpoint) if checkpoint else None,
                                                 parity=self._config.parity,
                                                 resolve_image=self._collect(self._images, plan))
        out_dir = job.job_dir / self._config.output.dirname
        if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
            raise IntakeError(job.config_path, "aitk-job", [
                f"{out_dir}: the previews folder is a symbolic link or a file; previewd writes only into a "
                f"folder of its own inside the run"])
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
        plan.request = True
        read = requests.read_request(path, allowed_roots=[Path("/")] if trusted else self._roots,
                                     default_parity=self._config.parity,
                                     resolve_image=self._collect(
                                         self._trusted_images if trusted else self._images, plan),
                                     limits=self._limits)
        self._check_prompts(path, requests.KIND, [(f"prompts.{i}", spec.prompt, spec.neg)
                                                   for i, spec in dict(read.renders).items()])
        if read.output_dir is not None and not trusted:
            self._check_output_dir(path, read.output_dir)
        target_dir = out_dir or read.output_dir or (self._config.outbox_root / self._request_folder(path))
        fmt = read.output_format or self._config.output.format
        loras = dict.fromkeys(spec.lora.path for _index, spec in read.renders if spec.lora is not None)
        steps = {lora: _lora_step(self._complete_lora(path, Path(lora), f"loras.{n}.path", trusted))
                 for n, lora in enumerate(loras)}
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

    def _complete_lora(self, request: Path, lora: Path, where: str, trusted: bool) -> Header:
        """The LoRA's checked header; its problems are the request's (which is all or nothing)."""
        if trusted:  # the user's own command: any local file, checked as a checkpoint all the same
            try:
                found = inspect(lora, limits=self._limits)
            except TruncatedSafetensors:
                raise NotReady(f"LoRA {lora} is still being written: waiting") from None
            except CorruptSafetensors as exc:
                raise IntakeError(lora, "checkpoint", [f"{where}: {exc}"]) from None
            if not found.complete:
                raise NotReady(f"LoRA {lora} is still being written: waiting")
            return found
        try:
            return self.checkpoint(lora)
        except _Unusable as exc:
            raise IntakeError(request, requests.KIND, [f"{where}: {lora.name}: {p}" for p in exc.problems]) from None

    def _request_folder(self, path: Path) -> Path:
        """Outbox folder of a request: its path below the watch root, so equal names never collide;
        `x.yaml` writes to `x/`, `x.yml` and `x.json` to `x.yml/` and `x.json/`, so requests that
        share a stem never share a folder."""
        name = path.stem if path.suffix == ".yaml" else path.name
        resolved = path.resolve()
        for root in self._roots:
            if resolved.is_relative_to(root):
                return resolved.parent.relative_to(root) / name
        return Path(name)

    def _check_output_dir(self, path: Path, out_dir: Path) -> None:
        resolved = out_dir.resolve()
        problem = None
        if resolved in self._roots or self.owning_run(resolved / "x") is not None:
            problem = "is a watched folder or a training run"
        elif path.parent.resolve().is_relative_to(resolved):
            problem = "holds this request"
        elif resolved.is_dir() and any(p.suffix in REQUEST_SUFFIXES and not p.name.startswith(".")
                                       and p.name != "manifest.json" for p in resolved.iterdir()):
            problem = "holds request files"
        if problem is not None:
            raise IntakeError(path, "request", [
                f"output.dir: {out_dir} {problem}; previews there would hide its files from previewd — name a "
                f"folder of its own"])

    # -- shared ------------------------------------------------------------------------------
    @staticmethod
    def _collect(store: ControlImageStore, plan: Plan) -> ResolveImage:
        """A resolver that verifies each control image and leaves its writing to the plan's owner."""

        def resolve(source: str, base_dir: Path, where: str) -> StoredImage:
            try:
                image, data = store.fetch(source, base_dir, where)
            except UrlPending:
                plan.waiting.append(source)
                raise ControlImageError(f"{where}: waiting for the download") from None
            plan.assets[Path(image.path)] = data
            return image

        return resolve


def _lora_step(header: Header) -> int | None:
    """The training step ai-toolkit wrote into a LoRA's header, if any (requests name any file)."""
    try:
        step = json.loads(header.metadata.get("training_info") or "{}").get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
