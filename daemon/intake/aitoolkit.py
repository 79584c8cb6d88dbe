"""An ai-toolkit training run (its `config.yaml`) -> the RenderSpecs of its own sample prompts.

Everything follows ai-toolkit's code as read in aitk-sampling.md §A, §B and the §F.1 mapping, so a
preview of step N is rendered from exactly the prompts, seeds and sizes of ai-toolkit's sample N.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from previewd.errors import IntakeError
from previewd.intake.controls import ControlResolver, ResolveImage
from previewd.intake.paths import is_url, resolve_path
from previewd.intake.prompt_flags import (PromptFlagError, aitk_seeds, floor_size, inject_trigger,
                                          parse_prompt_flags)
from previewd.catalog import validate_spec
from previewd.spec import CONTROL_SLOTS, AitkOptions, ControlImage, LoraSpec, RenderSpec

KIND = "aitk-job"
SAMPLE = "config.process[0].sample"

# SampleConfig defaults (toolkit/config_modules.py); `neg` really is the bool False.
_SECTION_DEFAULTS: dict[str, Any] = {"width": 512, "height": 512, "neg": False, "seed": 0, "walk_seed": False,
                                     "guidance_scale": 7, "sample_steps": 20, "network_multiplier": 1,
                                     "format": "jpg"}
_ITEM_KEYS = {"prompt", "width", "height", "neg", "seed", "guidance_scale", "sample_steps", "fps", "num_frames",
              "network_multiplier", "ctrl_idx", "do_cfg_norm", *CONTROL_SLOTS}
_MISSING_IMAGE_HELP = (" — ai-toolkit opens control images from this machine's disk, so these samples cannot "
                       "be rendered; fix the paths in config.yaml (relative paths are read from the job folder)")

# Variant named by name_or_path (lower-case, `_` read as `-`), most specific first.
_VARIANTS = (("qwen-image-edit-2511", "qwen_image_edit_plus_2511"),
             ("qwen-image-edit-2509", "qwen_image_edit_plus"),
             ("qwen-image-edit", "qwen_image_edit"),
             ("qwen-image-2512", "qwen_image_2512"),
             ("qwen-image", "qwen_image"),
             ("flux.2", "flux2"),
             ("flux2", "flux2"))
# arch (without `:tag`) -> (default id, {tag: id}); the arch picks ai-toolkit's model class.
_ARCHES = {
    "qwen_image": ("qwen_image", {"2512": "qwen_image_2512"}),
    "qwen_image_edit": ("qwen_image_edit", {}),
    "qwen_image_edit_plus": ("qwen_image_edit_plus", {"2509": "qwen_image_edit_plus",
                                                      "2511": "qwen_image_edit_plus_2511"}),
    "flux2": ("flux2", {}),
}


@dataclass(frozen=True)
class AitkSample:
    """One entry of `sample:`, resolved the way ai-toolkit's sample() resolves it."""

    index: int
    prompt: str
    """Final text: trigger injected, `--flags` parsed out, stripped."""
    raw_prompt: str
    neg: str
    width: int
    """Floored to 8, at least 64 (GenerateImageConfig); pipelines floor to the model divisor."""
    height: int
    seed: int
    sample_steps: int
    guidance_scale: float
    network_multiplier: float
    control: tuple[tuple[str, str], ...]
    """(slot, raw source) in slot order; `ctrl_img_1` defaults to `ctrl_img` as in SampleItem."""


@dataclass(frozen=True)
class AitkJob:
    config_path: Path
    job_dir: Path
    """The folder holding config.yaml: checkpoints and samples/ are here."""
    name: str
    """Checkpoint stem: `<name>_<step:09d>.safetensors` and the final `<name>.safetensors`."""
    model: str
    trigger_word: str | None
    samples: tuple[AitkSample, ...]
    sample_format: str
    aitk: AitkOptions
    settings: dict[str, Any]
    """Raw settings worth recording (arch, name_or_path, quantize, qtype, low_vram, train steps...)."""
    warnings: tuple[str, ...]


def model_id(arch: str, name_or_path: str) -> tuple[str, list[str]]:
    """§F.1: the arch picks the family, name_or_path the variant, a `:tag` only hints.

    Raises ValueError for an unsupported arch or an arch/name_or_path contradiction.
    """
    base, _, tag = arch.strip().partition(":")
    if base not in _ARCHES:
        raise ValueError(f"arch {arch!r} is not supported (supported: {', '.join(_ARCHES)} with optional :tag)")
    default, tags = _ARCHES[base]
    family = {default, *tags.values()}
    named = _variant_of(name_or_path)
    if named is not None and named not in family:
        raise ValueError(f"arch {arch!r} does not match name_or_path {name_or_path!r} (which is {named}); "
                         f"ai-toolkit loads the {base} model class, previewd cannot render that combination")
    hinted = tags.get(tag) if tag else None
    warnings = []
    if tag and hinted is None:
        warnings.append(f"model.arch: unknown tag {tag!r} ignored")
    if named is not None:
        if hinted is not None and hinted != named:
            warnings.append(f"model.arch: tag {tag!r} says {hinted} but name_or_path {name_or_path!r} is {named}; "
                            f"using {named}")
        return named, warnings
    chosen = hinted or default
    if len(family) > 1:
        warnings.append(f"model.name_or_path: cannot tell the variant from {name_or_path!r}; assuming {chosen}")
    return chosen, warnings


def _variant_of(name_or_path: str) -> str | None:
    text = name_or_path.lower().replace("_", "-")
    for key, mid in _VARIANTS:
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", text):
            return mid
    return None


def _replace_name(value: Any, name: str) -> Any:
    """ai-toolkit replaces `[name]` everywhere in the config (keys too) before reading it."""
    if isinstance(value, str):
        return value.replace("[name]", name)
    if isinstance(value, dict):
        return {_replace_name(k, name): _replace_name(v, name) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_name(v, name) for v in value]
    return value


def _check(value: Any, types: tuple[type, ...], what: str, where: str, problems: list[str]) -> Any:
    """`value` if it is one of `types` (bool is never a number), else None with a problem noted."""
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return value
    problems.append(f"{where}: expected {what}, got {value!r}")
    return None


def read_job(config_path: Path) -> AitkJob:
    """Parse an ai-toolkit `config.yaml`; raises IntakeError(config_path, "aitk-job", all problems)."""
    config_path = Path(config_path)
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise IntakeError(config_path, KIND, [f"file: cannot read: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise IntakeError(config_path, KIND, [f"yaml: {exc}"]) from None
    if not isinstance(raw, dict) or "job" not in raw or not isinstance(raw.get("config"), dict):
        raise IntakeError(config_path, KIND, ["job, config: not an ai-toolkit job config (needs `job:` and `config:`)"])
    job_name = raw["config"].get("name")
    if not isinstance(job_name, str) or not job_name:
        raise IntakeError(config_path, KIND, [f"config.name: expected the job name, got {job_name!r}"])
    config = _replace_name(raw, job_name)["config"]
    processes = config.get("process")
    if not isinstance(processes, list) or not processes or not isinstance(processes[0], dict):
        raise IntakeError(config_path, KIND, ["config.process: expected a list with at least one process"])
    process = processes[0]
    problems: list[str] = []
    warnings: list[str] = []
    name = process.get("name") or job_name

    network = process.get("network") or {}
    net_type = str(network.get("type", "lora")) if isinstance(network, dict) else None
    if net_type is None or net_type.lower() != "lora":
        problems.append(f"config.process[0].network.type: {net_type!r} is not supported (only `lora`: "
                        f"diffusers cannot load LoKr and other network types)")

    model = process.get("model")
    mid = None
    if not isinstance(model, dict):
        problems.append("config.process[0].model: missing (needs arch and name_or_path)")
        model = {}
    else:
        arch, nop = model.get("arch"), model.get("name_or_path")
        if not isinstance(arch, str) or not isinstance(nop, str):
            problems.append(f"config.process[0].model: needs arch and name_or_path as text "
                            f"(got arch={arch!r}, name_or_path={nop!r})")
        else:
            try:
                mid, hints = model_id(arch, nop)
                warnings += hints
            except ValueError as exc:
                problems.append(f"config.process[0].model: {exc}")

    trigger = process.get("trigger_word")
    if trigger is not None and not isinstance(trigger, str):
        trigger = str(trigger)
    section = process.get("sample")
    if not isinstance(section, dict):
        raise IntakeError(config_path, KIND, problems + [f"{SAMPLE}: missing: the job has no sample prompts to render"])

    job_dir = config_path.parent.resolve()
    samples = _read_samples(section, trigger, mid, job_dir, problems, warnings)
    fmt = section.get("format", _SECTION_DEFAULTS["format"])
    if fmt not in ("jpg", "png", "webp"):
        problems.append(f"{SAMPLE}.format: expected jpg, png or webp, got {fmt!r}")

    train = process.get("train") if isinstance(process.get("train"), dict) else {}
    save = process.get("save") if isinstance(process.get("save"), dict) else {}
    quantize = bool(model.get("quantize", False))
    multipliers = {s.network_multiplier for s in samples}
    settings = {
        "arch": model.get("arch"), "name_or_path": model.get("name_or_path"),
        "extras_name_or_path": model.get("extras_name_or_path"),
        "quantize": quantize, "qtype": model.get("qtype"), "quantize_te": model.get("quantize_te", quantize),
        "qtype_te": model.get("qtype_te"), "low_vram": bool(model.get("low_vram", False)),
        "layer_offloading": bool(model.get("layer_offloading", False)),
        # base_model.generate_images merges the LoRA only then (aitk-sampling.md §C.1).
        "lora_merged": not quantize and not model.get("layer_offloading") and len(multipliers) <= 1,
        "cache_text_embeddings": train.get("cache_text_embeddings"),
        "unload_text_encoder": train.get("unload_text_encoder"),
        "train_steps": train.get("steps"), "save_dtype": save.get("dtype"), "save_every": save.get("save_every"),
        "max_step_saves_to_keep": save.get("max_step_saves_to_keep"),
        "sample_every": section.get("sample_every"), "sampler": section.get("sampler"),
        "do_cfg_norm": bool(section.get("do_cfg_norm", False)), "training_folder": process.get("training_folder"),
    }
    if problems:
        raise IntakeError(config_path, KIND, problems)
    assert mid is not None
    options = AitkOptions(
        # Only ai-toolkit's edit-plus pipeline reads do_cfg_norm; the others always renormalise.
        do_cfg_norm=settings["do_cfg_norm"] and mid.startswith("qwen_image_edit_plus"),
        vae_tiling=settings["low_vram"] and mid.startswith("qwen_image"),
        lora_merged=settings["lora_merged"],
    )
    return AitkJob(config_path=config_path, job_dir=job_dir, name=name, model=mid, trigger_word=trigger,
                   samples=tuple(samples), sample_format=fmt, aitk=options, settings=settings,
                   warnings=tuple(warnings))


def _read_samples(section: dict[str, Any], trigger: str | None, mid: str | None, job_dir: Path,
                  problems: list[str], warnings: list[str]) -> list[AitkSample]:
    if section.get("samples"):
        key, entries = "samples", section["samples"]
    else:
        key, entries = "prompts", section.get("prompts") or []
    if not isinstance(entries, list) or not entries:
        problems.append(f"{SAMPLE}: no prompts (`samples:` and `prompts:` are empty)")
        return []
    defaults = {k: section.get(k, v) for k, v in _SECTION_DEFAULTS.items()}
    items: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        where = f"{SAMPLE}.{key}[{i}]"
        if key == "prompts":
            entry = {"prompt": entry}
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with `prompt:`, got {entry!r}")
            entry = {"prompt": ""}
        unknown = sorted(str(k) for k in entry if k not in _ITEM_KEYS)
        if unknown:
            warnings.append(f"{where}: unknown keys ignored by ai-toolkit: {', '.join(unknown)}")
        items.append(entry)

    base_seed = _check(defaults["seed"], (int,), "an integer", f"{SAMPLE}.seed", problems) or 0
    item_seeds = [_check(it["seed"], (int,), "an integer", f"{SAMPLE}.{key}[{i}].seed", problems)
                  if it.get("seed") is not None else None for i, it in enumerate(items)]
    seeds = aitk_seeds(base_seed, bool(defaults["walk_seed"]), item_seeds)

    samples = []
    neg_missing = missing_explained = False
    for i, item in enumerate(items):
        where = f"{SAMPLE}.{key}[{i}]"
        raw_prompt = item.get("prompt")
        if not isinstance(raw_prompt, str):
            problems.append(f"{where}.prompt: expected text, got {raw_prompt!r}")
            continue

        def field(name: str, types: tuple[type, ...], what: str) -> Any:
            src = f"{where}.{name}" if name in item else f"{SAMPLE}.{name}"
            return _check(item.get(name, defaults[name]), types, what, src, problems)

        width = field("width", (int,), "an integer")
        height = field("height", (int,), "an integer")
        steps = field("sample_steps", (int,), "an integer")
        guidance = field("guidance_scale", (int, float), "a number")
        multiplier = field("network_multiplier", (int, float), "a number")
        neg = item.get("neg", defaults["neg"])
        if neg is False:
            # template.format(False) in ai-toolkit: the negative prompt really is the text "False".
            neg, neg_missing = "False", True
        elif neg is None:
            warnings.append(f"{where}.neg: null, rendered with an empty negative prompt")
            neg = ""
        elif not isinstance(neg, str):
            problems.append(f"{where}.neg: expected text, got {neg!r}")
        ctrl_img = item.get("ctrl_img")
        control = {"ctrl_img": ctrl_img, "ctrl_img_1": item.get("ctrl_img_1", ctrl_img),
                   "ctrl_img_2": item.get("ctrl_img_2"), "ctrl_img_3": item.get("ctrl_img_3")}
        try:
            flags = parse_prompt_flags(inject_trigger(raw_prompt, trigger))
        except PromptFlagError as exc:
            problems.append(f"{where}.prompt: {exc}")
            continue
        if flags.dropped:
            warnings.append(f"{where}.prompt: flags without effect here dropped: "
                            + ", ".join(f"--{f}" for f in flags.dropped))
        if flags.ctrl_img is not None:
            control["ctrl_img"] = flags.ctrl_img
        if None in (width, height, steps, guidance, multiplier) or not isinstance(neg, str):
            continue
        controls = []
        for slot, src in control.items():
            if src is None:
                continue
            if not isinstance(src, str):
                problems.append(f"{where}.{slot}: expected a file path, got {src!r}")
                continue
            controls.append((slot, src))
            # An inherited ctrl_img_1 is ctrl_img again: report the file once, where it was written.
            inherited = slot == "ctrl_img_1" and "ctrl_img_1" not in item
            local = not is_url(src) and not src.startswith("data:")
            if local and not inherited and not resolve_path(src, job_dir).is_file():
                problems.append(f"{where}.{slot}: file not found: {resolve_path(src, job_dir)}"
                                + ("" if missing_explained else _MISSING_IMAGE_HELP))
                missing_explained = True
        sample = AitkSample(
            index=i, prompt=flags.prompt, raw_prompt=raw_prompt,
            neg=flags.neg if flags.neg is not None else neg,
            width=floor_size(flags.width if flags.width is not None else width),
            height=floor_size(flags.height if flags.height is not None else height),
            seed=flags.seed if flags.seed is not None else seeds[i],
            sample_steps=flags.sample_steps if flags.sample_steps is not None else steps,
            guidance_scale=float(flags.guidance_scale if flags.guidance_scale is not None else guidance),
            network_multiplier=float(flags.network_multiplier if flags.network_multiplier is not None
                                     else multiplier),
            control=tuple(controls),
        )
        if mid is not None:
            controls_stub = tuple(ControlImage(slot=s, path=src) for s, src in sample.control)
            problems += _spec_problems(where, lambda: _spec(mid, "aitk", sample, AitkOptions(), None, controls_stub))
        samples.append(sample)
    if neg_missing and mid != "flux2":
        warnings.append(f"{SAMPLE}.neg: not set; ai-toolkit encodes the negative prompt \"False\", "
                        f"so previewd does too (set `neg: \"\"` for an empty one)")
    return samples


def _spec(mid: str, parity: str, sample: AitkSample, options: AitkOptions, lora: LoraSpec | None,
          controls: tuple[ControlImage, ...]) -> RenderSpec:
    return RenderSpec(model=mid, parity=parity, prompt=sample.prompt, neg=sample.neg, width=sample.width,
                      height=sample.height, seed=sample.seed, sample_steps=sample.sample_steps,
                      guidance_scale=sample.guidance_scale, lora=lora, control_images=controls, aitk=options)


def _spec_problems(where: str, build: Callable[[], RenderSpec]) -> list[str]:
    try:
        spec = build()
    except ValidationError as exc:
        return [f"{where}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e['input']!r})"
                for e in exc.errors()]
    return [f"{where}.{p}" for p in validate_spec(spec)]


def specs_for_checkpoint(job: AitkJob, lora_path: str | None, *, parity: str, resolve_image: ResolveImage,
                         lora_sha256: str | None = None) -> list[tuple[int, RenderSpec]]:
    """One (sample index, RenderSpec) per sample prompt, control images snapshotted via `resolve_image`.

    `lora_path` None renders the base model: ai-toolkit's step-0 baseline sample.

    Raises IntakeError(job.config_path, "aitk-job", problems) listing every image that failed.
    """
    problems: list[str] = []
    resolver = ControlResolver(resolve_image, job.job_dir)
    renders = []
    for sample in job.samples:
        controls, failed = resolver.resolve(f"{SAMPLE}.samples[{sample.index}]", sample.control)
        problems += failed
        lora = None if lora_path is None else LoraSpec(
            path=lora_path, network_multiplier=sample.network_multiplier, sha256=lora_sha256)
        spec = _spec(job.model, parity, sample, job.aitk, lora, tuple(controls))
        renders.append((sample.index, spec))
    if problems:
        raise IntakeError(job.config_path, KIND, problems)
    return renders


def _checkpoint_match(job: AitkJob, path: Path) -> re.Match[str] | None:
    if path.parent.resolve() != job.job_dir:
        return None
    return re.fullmatch(rf"{re.escape(job.name)}(?:_(\d{{9,}}))?\.safetensors", path.name)


def is_checkpoint(job: AitkJob, path: Path) -> bool:
    """`<name>_<step:09d>.safetensors` or the final `<name>.safetensors` directly in the job folder."""
    return _checkpoint_match(job, Path(path)) is not None


def checkpoint_step(job: AitkJob, path: Path, header_metadata: dict[str, Any] | None = None) -> int | None:
    """The training step of a checkpoint of `job`; None if unknown or not a checkpoint (see is_checkpoint).

    The final `<name>.safetensors` has no step in its name: it comes from the header's
    `training_info` (a JSON string, e.g. '{"step": 2000, "epoch": 0}').
    """
    match = _checkpoint_match(job, Path(path))
    if match is None:
        return None
    if match.group(1) is not None:
        return int(match.group(1))
    info = (header_metadata or {}).get("training_info")
    try:
        step = (json.loads(info) if isinstance(info, str) else info or {}).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def parity_gaps(job: AitkJob) -> list[str]:
    """Known reasons this run's own samples can differ from previewd's renders (aitk-sampling.md §C.4-5)."""
    s = job.settings
    gaps = []
    if s["quantize"]:
        gaps.append(f"ai-toolkit sampled a {s['qtype'] or 'qfloat8'}-quantised transformer (previewd applies the "
                    "LoRA unmerged as it did, but renders the unquantised model): small differences are expected")
    if s["quantize_te"]:
        gaps.append(f"ai-toolkit's text encoder was quantised ({s['qtype_te'] or s['qtype'] or 'qfloat8'}); "
                    "previewd's is not unless models.<id>.quantize_text_encoder says so")
    if s["save_dtype"] not in (None, "fp32", "float32"):
        gaps.append(f"checkpoints are saved in {s['save_dtype']}; ai-toolkit samples with the live training "
                    "weights, previewd with the saved ones")
    return gaps

