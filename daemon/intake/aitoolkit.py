"""An ai-toolkit training run (its `config.yaml`) -> the RenderSpecs of its own sample prompts.

Read the way ai-toolkit 0.12.26 reads it (aitk-sampling.md §A, §B, §F.1): the process whose
folder holds the config, then `sample:` through SampleConfig/SampleItem's defaults and coercions
(the pydantic models below), then GenerateImageConfig's prompt flags and seed rules, so the preview
of step N is rendered from exactly the prompts, seeds and sizes of ai-toolkit's sample N. Where
ai-toolkit would crash on a setting, the run is refused with the reason.
"""

from __future__ import annotations

import functools
import json
import math
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo

from previewd.catalog import MODELS, validate_spec
from previewd.config import LimitsConfig
from previewd.errors import IntakeError
from previewd.intake.controls import ControlResolver, ResolveImage
from previewd.intake.paths import is_url, resolve_path
from previewd.intake.prompt_flags import (RANDOM_SEED, TORCH_SEEDS, PromptFlagError, aitk_seeds, floor_size,
                                          inject_trigger, parse_prompt_flags, torch_seed)
from previewd.intake.quantization import QuantizationSettings, of_run
from previewd.safe_files import parse_json, parse_yaml, read_text, why_unreadable
from previewd.spec import NUMBERED_CONTROL_SLOTS, AitkOptions, ControlImage, LoraSpec, RenderSpec
from previewd.validation_errors import did_you_mean, format_validation_error

KIND = "aitk-job"
DEFAULT_LIMITS = LimitsConfig()

_MISSING_IMAGE_HELP = (" — ai-toolkit opens control images from this machine's disk, so these samples cannot "
                       "be rendered; fix the paths in config.yaml (previewd reads a relative path from the run "
                       "folder, then from `aitk_root`, ai-toolkit's own folder)")
_OUTSIDE_ROOTS_HELP = (" (control images uploaded through ai-toolkit's UI live in its data folder, "
                       "<dataRoot>/images/: add that folder to `allowed_roots`)")

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
_QWEN_EDIT_IDS = ("qwen_image_edit", "qwen_image_edit_plus", "qwen_image_edit_plus_2511")
_ODD_NEGS = {"False": "not set, and ai-toolkit's default is the boolean False", "None": "null"}


# -- ai-toolkit's sample settings ---------------------------------------------------------------
# Each validator accepts what ai-toolkit's sampler works with and converts it the way ai-toolkit
# ends up using it; anything its sampler would crash on is refused with the reason.

def _not_bool(value: Any) -> None:
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")


def _size(value: Any) -> int:
    """GenerateImageConfig floors sizes with `v - v % 8`: a float is floored, text crashes it."""
    _not_bool(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("expected a number of pixels (ai-toolkit's sampler crashes on anything else)")
    return math.floor(value)


def _steps(value: Any) -> int:
    _not_bool(value)
    if not isinstance(value, int):
        raise ValueError("expected a whole number (ai-toolkit's scheduler crashes on anything else)")
    return value


def _number(value: Any) -> float:
    _not_bool(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("expected a number (ai-toolkit's sampler crashes on anything else)")
    return float(value)


def _multiplier(value: Any, info: ValidationInfo) -> float:
    """SampleItem converts a multiplier written as text and falls back to 1.0 when it cannot."""
    if isinstance(value, str):
        try:
            return _number(float(value))
        except ValueError:
            _warn(info, f"network_multiplier: {value!r} is not a number; ai-toolkit samples with 1.0, "
                        f"and so does previewd")
            return 1.0
    return _number(value)


def _seed(value: Any, info: ValidationInfo) -> int:
    """torch.manual_seed calls int() on the seed, so text and floats work too; but text is never
    the -1 that GenerateImageConfig randomises, so its negatives stay fixed (torch wraps them)."""
    _not_bool(value)
    if isinstance(value, str):
        if info.data.get("walk_seed"):
            raise ValueError("a seed written as text cannot walk (ai-toolkit crashes adding the prompt index "
                             "to it): write it as a number")
        try:
            value = int(value)
        except ValueError:
            raise ValueError("expected a whole number") from None
        return torch_seed(value)
    if isinstance(value, float) and math.isfinite(value):
        value = int(value)
    if not isinstance(value, int):
        raise ValueError("expected a whole number")
    if value not in TORCH_SEEDS:
        raise ValueError("outside what torch.manual_seed accepts (-2**63 to 2**64 - 1)")
    return value


def _neg(value: Any) -> str:
    """The text the Qwen pipelines encode: `template.format(neg)` turns None into "None" and the
    missing-key default False into "False"."""
    if isinstance(value, (str, int, float)) or value is None:
        return str(value)
    raise ValueError("expected text")


def _prompt(value: Any) -> str:
    if value is None:
        raise ValueError("no prompt: ai-toolkit leaves such an entry out of its prompt list but not out of "
                         "its sample settings, so every later sample would get the wrong settings")
    if not isinstance(value, str):
        raise ValueError("expected text (ai-toolkit's prompt handling crashes on anything else; quote it)")
    return value


def _image_path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected the path of an image file (ai-toolkit cannot open anything else)")
    return value


def _warn(info: ValidationInfo, message: str) -> None:
    context = info.context or {}
    context.setdefault("warnings", []).append(f"{context.get('where', '')}.{message}")


Size = Annotated[int, BeforeValidator(_size)]
Steps = Annotated[int, BeforeValidator(_steps)]
Number = Annotated[float, BeforeValidator(_number)]
Multiplier = Annotated[float, BeforeValidator(_multiplier)]
Seed = Annotated[int, BeforeValidator(_seed)]
Neg = Annotated[str, BeforeValidator(_neg)]
Truthy = Annotated[bool, BeforeValidator(bool)]
"""ai-toolkit tests these with `if value:`, so any truthy value (even the text "false") counts."""
ImagePath = Annotated[str | None, BeforeValidator(_image_path)]


class _AitkSettings(BaseModel):
    # ai-toolkit reads settings with kwargs.get(): keys it does not know are ignored.
    model_config = ConfigDict(extra="allow", frozen=True)


Settings = TypeVar("Settings", bound=_AitkSettings)


class SampleSettings(_AitkSettings):
    """`sample:` as SampleConfig reads it, with its defaults (config_modules.py)."""

    width: Size = 512
    height: Size = 512
    neg: Neg = "False"
    walk_seed: Truthy = False
    seed: Seed = 0
    """Declared after walk_seed: a text seed is refused only when it walks."""
    guidance_scale: Number = 7.0
    sample_steps: Steps = 20
    network_multiplier: Multiplier = 1.0
    format: str = "jpg"
    """The sample files' extension, used as written (`jpeg`, `JPG`...)."""
    do_cfg_norm: Truthy = False
    prompts: list[Any] = []
    samples: list[Any] = Field(None)
    """None: not given, so built from `prompts`; given, even empty, it wins (config_modules.py:111)."""


class SampleItemSettings(_AitkSettings):
    """One `samples:` entry as SampleItem reads it; None: not given, the section's value applies.
    (A null that ai-toolkit would pass on and crash on is refused: the defaults are not validated.)"""

    prompt: Annotated[str, BeforeValidator(_prompt)] = Field(None, validate_default=True)
    width: Size = Field(None)
    height: Size = Field(None)
    neg: Neg = Field(None)
    seed: Seed | None = None
    """null: the running seed, as when it is not given."""
    guidance_scale: Number = Field(None)
    sample_steps: Steps = Field(None)
    network_multiplier: Multiplier = Field(None)
    ctrl_img: ImagePath = None
    ctrl_img_1: ImagePath = None
    ctrl_img_2: ImagePath = None
    ctrl_img_3: ImagePath = None
    # Read by ai-toolkit but without effect on these image models.
    ctrl_idx: Any = None
    fps: Any = None
    num_frames: Any = None
    do_cfg_norm: Any = None
    """Stored per item by SampleItem, but sample() reads only the section's."""


# -- the run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AitkSample:
    """One entry of `sample:`, resolved the way ai-toolkit's sample() resolves it."""

    index: int
    where: str
    """Its place in the config, e.g. `config.process[0].sample.samples[3]`."""
    prompt: str
    """Final text: trigger injected, `--flags` parsed out, stripped."""
    raw_prompt: str
    neg: str
    width: int
    """Floored to 8, at least 64 (GenerateImageConfig); pipelines floor to the model divisor."""
    height: int
    seed: int
    """-1: random (ai-toolkit drew one); otherwise the seed torch used, negatives wrapped to 64 bits."""
    sample_steps: int
    guidance_scale: float
    network_multiplier: float
    control: tuple[tuple[str, str], ...]
    """(slot, source) that this model's ai-toolkit class reads, in slot order; local paths absolute."""


@dataclass(frozen=True)
class AitkJob:
    config_path: Path
    job_dir: Path
    """The folder holding config.yaml, `training_folder/<process name>`: checkpoints and samples/."""
    name: str
    """The job's `config.name`, the checkpoint stem: `<name>_<step:09d>.safetensors`, `<name>.safetensors`."""
    process_index: int
    """The process of `config.process` that writes this folder."""
    model: str
    base: str | None
    """The run's own `name_or_path` when previewd renders on it (RenderSpec.base)."""
    base_gap: str | None
    """Why the run's own base could not be used, when it could not."""
    trigger_word: str | None
    samples: tuple[AitkSample, ...]
    sample_format: str
    aitk: AitkOptions
    settings: dict[str, Any]
    """Raw settings worth recording (arch, name_or_path, quantize, qtype, low_vram, train steps...)."""
    warnings: tuple[str, ...]
    quantization_gaps: tuple[str, ...] = ()
    """What of the run's quantisation previewd does not reproduce (it reproduces qfloat8 and uintN)."""


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
    hinted = tags.get(tag) if tag else None
    warnings = []
    if tag and hinted is None:
        warnings.append(f"model.arch: unknown tag {tag!r} ignored")
    if base == "qwen_image" and named in _QWEN_EDIT_IDS:
        # QwenImageModel loads any Qwen-Image weights: the edit weights sample through its
        # text-to-image pipeline (how edit models are trained without control images).
        warnings.append(f"model: ai-toolkit samples the edit weights {name_or_path!r} with its text-to-image "
                        f"pipeline (arch {arch!r}); so does previewd")
        return hinted or default, warnings
    if named is not None and named not in family:
        raise ValueError(f"arch {arch!r} does not match name_or_path {name_or_path!r} (which is {named}); "
                         f"ai-toolkit loads the {base} model class, previewd cannot render that combination")
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


def _load(path: Path, roots: tuple[Path, ...] | None, limits: LimitsConfig) -> Any:
    """The parsed file, read within `roots` and `limits` (previewd.safe_files): JSON syntax first
    (ai-toolkit's `.job_config.json`, copied into place, may be indented with tabs, which YAML
    refuses), else YAML."""
    text = read_text(path, roots, limits)
    if text.lstrip().startswith("{"):
        try:
            return parse_json(text, limits)
        except json.JSONDecodeError:
            pass  # a YAML flow mapping
    return parse_yaml(text, limits)


def _is_job(data: Any) -> bool:
    return isinstance(data, dict) and "job" in data and isinstance(data.get("config"), dict)


def is_job_config(path: Path, *, roots: tuple[Path, ...] | None = None,
                  limits: LimitsConfig = DEFAULT_LIMITS) -> bool:
    """Whether `path` is an ai-toolkit job config by its parsed content (`job:` and a `config:`
    mapping), in YAML or JSON syntax. False for anything unreadable, unparsable, outside `roots`
    or beyond `limits`; never raises."""
    try:
        info = Path(path).stat()
    except (OSError, ValueError):
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size > limits.nbytes("document_mb"):
        return False
    return _parses_as_job(str(path), info.st_mtime_ns, info.st_size, roots, limits)


@functools.lru_cache(maxsize=1024)
def _parses_as_job(path: str, _mtime_ns: int, _size: int, roots: tuple[Path, ...] | None,
                   limits: LimitsConfig) -> bool:
    """Cached by (path, mtime, size): the watcher asks for every parent of every file it sees."""
    try:
        return _is_job(_load(Path(path), roots, limits))
    except Exception:  # any parser failure (YAML, JSON, encoding, nesting depth) means "not a job config"
        return False


def read_job(config_path: Path, *, aitk_root: Path | None = None, roots: tuple[Path, ...] | None = None,
             limits: LimitsConfig = DEFAULT_LIMITS) -> AitkJob:
    """Parse an ai-toolkit job config (`config.yaml`, YAML or JSON syntax); raises
    IntakeError(config_path, "aitk-job", every problem), RefusedFile for a file that may not be read.

    `aitk_root`: ai-toolkit's own folder, which it resolves relative paths against. `roots`: where
    the config may lie (None: anywhere).
    """
    config_path = Path(config_path)
    try:
        raw = _load(config_path, roots, limits)
    except (OSError, UnicodeDecodeError) as exc:
        raise IntakeError(config_path, KIND, [f"file: cannot read: {why_unreadable(exc)}"]) from None
    except yaml.YAMLError as exc:
        raise IntakeError(config_path, KIND, [f"yaml: {exc}"]) from None
    if not _is_job(raw):
        raise IntakeError(config_path, KIND, ["job, config: not an ai-toolkit job config (needs `job:` and `config:`)"])
    job_name = raw["config"].get("name")
    if not isinstance(job_name, str) or not job_name:
        raise IntakeError(config_path, KIND, [f"config.name: expected the job name, got {job_name!r}"])
    config = _replace_name(raw, job_name)["config"]
    index, process = _process_of(config, config_path, job_name)
    where = f"config.process[{index}]"
    problems: list[str] = []
    warnings: list[str] = []

    network = process.get("network") or {}
    net_type = str(network.get("type", "lora")) if isinstance(network, dict) else None
    if net_type is None or net_type.lower() != "lora":
        problems.append(f"{where}.network.type: {net_type!r} is not supported (only `lora`: "
                        f"diffusers cannot load LoKr and other network types)")

    model = process.get("model")
    mid = base = base_gap = None
    if not isinstance(model, dict):
        problems.append(f"{where}.model: missing (needs arch and name_or_path)")
        model = {}
    else:
        arch, nop = model.get("arch"), model.get("name_or_path")
        if not isinstance(arch, str) or not isinstance(nop, str):
            problems.append(f"{where}.model: needs arch and name_or_path as text "
                            f"(got arch={arch!r}, name_or_path={nop!r})")
        else:
            try:
                mid, hints = model_id(arch, nop)
                warnings += hints
                base, base_gap = _run_base(nop, mid, aitk_root)
            except ValueError as exc:
                problems.append(f"{where}.model: {exc}")

    trigger = process.get("trigger_word")
    if trigger is not None and not isinstance(trigger, str):
        problems.append(f"{where}.trigger_word: expected text, got {trigger!r} (ai-toolkit's trigger injection "
                        f"crashes on it; quote it)")
        trigger = None
    section_raw = process.get("sample", {})
    if not isinstance(section_raw, dict):
        raise IntakeError(config_path, KIND, problems + [
            f"{where}.sample: expected the sample settings, got {section_raw!r} (ai-toolkit cannot read it)"])

    job_dir = config_path.parent.resolve()
    context = _Context(where=f"{where}.sample", mid=mid, trigger=trigger, job_dir=job_dir, aitk_root=aitk_root,
                       problems=problems, warnings=warnings)
    section, samples = _read_samples(section_raw, context)

    quantization = (of_run(model, mid, where=f"{where}.model",
                           search=[job_dir, *([aitk_root] if aitk_root is not None else [])])
                    if mid is not None else QuantizationSettings())
    problems += quantization.problems
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
        "sample_every": section_raw.get("sample_every"), "sampler": section_raw.get("sampler"),
        "do_cfg_norm": section.do_cfg_norm if section else False,
        "training_folder": process.get("training_folder"),
    }
    if problems:
        raise IntakeError(config_path, KIND, problems)
    assert mid is not None and section is not None
    options = AitkOptions(
        # Only ai-toolkit's edit-plus pipeline reads do_cfg_norm; the others always renormalise.
        do_cfg_norm=settings["do_cfg_norm"] and mid.startswith("qwen_image_edit_plus"),
        vae_tiling=settings["low_vram"] and mid.startswith("qwen_image"),
        lora_merged=settings["lora_merged"],
        **quantization.options,
    )
    return AitkJob(config_path=config_path, job_dir=job_dir, name=job_name, process_index=index, model=mid,
                   base=base, base_gap=base_gap, trigger_word=trigger, samples=tuple(samples),
                   sample_format=section.format, aitk=options, settings=settings, warnings=tuple(warnings),
                   quantization_gaps=tuple(quantization.gaps))


def _process_of(config: dict[str, Any], config_path: Path, job_name: str) -> tuple[int, dict[str, Any]]:
    """The process that writes this run folder. Each process writes the whole job config into
    `training_folder/<process name>` (BaseTrainProcess.py:45), its name defaulting to the job's."""
    processes = config.get("process")
    if not isinstance(processes, list) or not processes or not all(isinstance(p, dict) for p in processes):
        raise IntakeError(config_path, KIND, ["config.process: expected a list of processes (mappings)"])
    folder = config_path.parent.name
    names = [str(p["name"]) if p.get("name") is not None else job_name for p in processes]
    mine = [i for i, name in enumerate(names) if name == folder]
    if len(mine) == 1:
        return mine[0], processes[mine[0]]
    if not mine and len(processes) == 1:
        return 0, processes[0]  # a run folder copied or renamed by hand
    if mine:
        raise IntakeError(config_path, KIND, [
            f"config.process: processes {', '.join(f'[{i}]' for i in mine)} all write into {folder!r}; previewd "
            f"cannot tell which one wrote a checkpoint: give each process its own `name`"])
    raise IntakeError(config_path, KIND, [
        f"config.process: none of the {len(processes)} processes writes into this folder {folder!r} "
        f"(ai-toolkit writes each into training_folder/<process name>; names here: {', '.join(names)})"])


def _run_base(name_or_path: str, mid: str, aitk_root: Path | None) -> tuple[str | None, str | None]:
    """(RenderSpec.base, parity gap): the run's own weights when they are on this machine.

    The stock hub id of `mid` stays None: `models.<id>.path` is where its weights are. A folder
    counts as written, a relative one from ai-toolkit's folder (its working directory); a hub
    id only when it is in the local Hugging Face cache (previewd never downloads).
    """
    if name_or_path.strip().lower() == MODELS[mid].hub_id.lower():
        return None, None
    folder: Path | None = Path(name_or_path).expanduser()
    if not folder.is_absolute():
        folder = aitk_root / folder if aitk_root is not None else None
    if folder is not None and folder.is_dir():
        return str(folder.resolve()), None
    if _in_hf_cache(name_or_path):
        return name_or_path, None
    return None, (f"the run's base model {name_or_path!r} is not on this machine (neither a diffusers folder nor "
                  f"a hub id in the local Hugging Face cache; previewd never downloads), so previewd renders on "
                  f"the configured models.{mid}.path ({MODELS[mid].hub_id} unless configured otherwise) instead")


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, not a valid repo id, unreadable cache: all mean "not here"
        return False
    return True


@dataclass
class _Context:
    """What reading one run's samples needs, and where its problems and warnings go."""

    where: str
    mid: str | None
    trigger: str | None
    job_dir: Path
    aitk_root: Path | None
    problems: list[str]
    warnings: list[str]
    odd_negs: set[str] = field(default_factory=set)
    """"False"/"None": negative prompts that are the text of a missing or null `neg`."""


def _validate(model: type[Settings], data: dict[str, Any], where: str, context: _Context) -> Settings | None:
    try:
        return model.model_validate(data, context={"where": where, "warnings": context.warnings})
    except ValidationError as exc:
        context.problems += format_validation_error(exc, model, where=where)
        return None


def _read_samples(raw: dict[str, Any], ctx: _Context) -> tuple[SampleSettings | None, list[AitkSample]]:
    section = _validate(SampleSettings, raw, ctx.where, ctx)
    if section is None:
        return None, []
    if "samples" in section.model_fields_set:
        key, entries = "samples", section.samples or []
    else:
        key, entries = "prompts", [{"prompt": p} for p in section.prompts]
    if not entries:
        ctx.warnings.append(f"{ctx.where}.{key}: empty: ai-toolkit samples nothing for this run, so previewd "
                            f"renders nothing")
        return section, []
    items: list[SampleItemSettings | None] = []
    for i, entry in enumerate(entries):
        where = f"{ctx.where}.{key}[{i}]"
        item = None
        if not isinstance(entry, dict):
            ctx.problems.append(f"{where}: expected a mapping with `prompt:`, got {entry!r}")
        else:
            item = _validate(SampleItemSettings, entry, where, ctx)
            _warn_unknown_keys(item, where, ctx)
        items.append(item)
    seeds = aitk_seeds(section.seed, section.walk_seed, [item.seed if item else None for item in items])
    samples = []
    for i, (item, seed) in enumerate(zip(items, seeds)):
        sample = _sample(i, f"{ctx.where}.{key}[{i}]", item, section, seed, ctx) if item else None
        if sample is not None:
            samples.append(sample)
    if ctx.mid != "flux2":  # FLUX.2 samples without a negative prompt
        for text in sorted(ctx.odd_negs):
            ctx.warnings.append(f"{ctx.where}.neg: {_ODD_NEGS[text]}: ai-toolkit encodes the negative prompt "
                                f"\"{text}\", so previewd does too (set `neg: \"\"` for an empty one)")
    return section, samples


def _warn_unknown_keys(item: SampleItemSettings | None, where: str, ctx: _Context) -> None:
    for key in sorted(str(k) for k in (item.model_extra if item else None) or {}):
        ctx.warnings.append(f"{where}.{key}: unknown key, ignored by ai-toolkit"
                            + did_you_mean(key, SampleItemSettings.model_fields))


def _sample(index: int, where: str, item: SampleItemSettings, section: SampleSettings, seed: int,
            ctx: _Context) -> AitkSample | None:
    try:
        flags = parse_prompt_flags(inject_trigger(item.prompt, ctx.trigger))
    except PromptFlagError as exc:
        ctx.problems.append(f"{where}.prompt: {exc}")
        return None
    if flags.dropped:
        ctx.warnings.append(f"{where}.prompt: flags without effect here dropped: "
                            + ", ".join(f"--{f}" for f in flags.dropped))
    try:
        # -1 is random only as the seed GenerateImageConfig is given; a `--seed` flag is fixed.
        final_seed = (torch_seed(flags.seed) if flags.seed is not None
                      else seed if seed == RANDOM_SEED else torch_seed(seed))
    except ValueError as exc:
        ctx.problems.append(f"{where}.seed: {exc} (ai-toolkit crashes on it)")
        return None
    width = flags.width if flags.width is not None else _pick(item.width, section.width)
    height = flags.height if flags.height is not None else _pick(item.height, section.height)
    neg = flags.neg if flags.neg is not None else _pick(item.neg, section.neg)
    if flags.neg is None and neg in _ODD_NEGS:
        ctx.odd_negs.add(neg)
    multiplier = (flags.network_multiplier if flags.network_multiplier is not None
                  else _pick(item.network_multiplier, section.network_multiplier))
    controls = _controls(where, item, flags.ctrl_img, ctx)
    if controls is None:
        return None
    sample = AitkSample(
        index=index, where=where, prompt=flags.prompt, raw_prompt=item.prompt, neg=neg,
        width=floor_size(width), height=floor_size(height), seed=final_seed,
        sample_steps=flags.sample_steps if flags.sample_steps is not None else _pick(item.sample_steps,
                                                                                     section.sample_steps),
        guidance_scale=float(flags.guidance_scale if flags.guidance_scale is not None
                             else _pick(item.guidance_scale, section.guidance_scale)),
        network_multiplier=float(multiplier), control=controls)
    if ctx.mid is not None:
        stub = tuple(ControlImage(slot=slot, path=src) for slot, src in sample.control)
        ctx.problems += _spec_problems(where, ctx.mid, sample, stub)
    return sample


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _controls(where: str, item: SampleItemSettings, flag_ctrl_img: str | None,
              ctx: _Context) -> tuple[tuple[str, str], ...] | None:
    """The control images this model's ai-toolkit class reads, local paths found on disk; None
    after a problem.

    GenerateImageConfig sets `ctrl_img_1` to `ctrl_img` when it is None (even when written as
    null, config_modules.py:1184); a `--ctrl_img` flag is parsed after that and sets `ctrl_img` only.
    """
    given = {"ctrl_img": item.ctrl_img, "ctrl_img_1": item.ctrl_img_1 or item.ctrl_img,
             "ctrl_img_2": item.ctrl_img_2, "ctrl_img_3": item.ctrl_img_3}
    if flag_ctrl_img is not None:
        given["ctrl_img"] = flag_ctrl_img
    mid = ctx.mid
    info = MODELS.get(mid) if mid else None
    if info is None:
        return ()
    if info.family == "qwen" and info.control == "none":
        if given["ctrl_img"] is not None:
            ctx.problems.append(f"{where}.ctrl_img: ai-toolkit's {mid} model takes no control image (its sampler "
                                f"raises NotImplementedError for `ctrl_img`)")
            return None
        chosen: dict[str, str | None] = {}
        ignored = [s for s in NUMBERED_CONTROL_SLOTS if s in item.model_fields_set and given[s]]
    elif info.control == "single":
        # qwen_image_edit.py hands the pipeline `ctrl_img` only; its text encoder reads the first
        # of ctrl_img, ctrl_img_1.. which is then `ctrl_img` too.
        chosen = {"ctrl_img": given["ctrl_img"]}
        ignored = [s for s in NUMBERED_CONTROL_SLOTS
                   if s in item.model_fields_set and given[s] and given[s] != given["ctrl_img"]]
    elif info.control == "multi":
        chosen = given  # encoded as ai-toolkit's list [ctrl_img?, ctrl_img_1?, _2?, _3?]
        ignored = []
    else:  # FLUX.2 reads `ctrl_img` or else `ctrl_img_1`, then `_2` and `_3`
        first = "ctrl_img" if given["ctrl_img"] is not None else "ctrl_img_1"
        chosen = {first: given[first], "ctrl_img_2": given["ctrl_img_2"], "ctrl_img_3": given["ctrl_img_3"]}
        ignored = []
    if ignored:
        ctx.warnings.append(f"{where}: {', '.join(ignored)} ignored: ai-toolkit's {mid} model does not read "
                            f"{'it' if len(ignored) == 1 else 'them'}, nor does previewd")
    wanted = [(slot, source) for slot, source in chosen.items() if source is not None]
    found: dict[str, str | None] = {}
    for slot, source in wanted:  # each file once: the ctrl_img_1 copy is not reported again
        if source not in found:
            found[source] = _find_control(f"{where}.{slot}", source, ctx)
    located = {source: path for source, path in found.items() if path is not None}
    if len(located) < len(found):
        return None
    return tuple((slot, located[source]) for slot, source in wanted)


def _find_control(where: str, source: str, ctx: _Context) -> str | None:
    """A local control image as an absolute path: the run folder first, then ai-toolkit's folder
    (where ai-toolkit itself reads relative paths from). URLs and data URIs pass as they are."""
    if is_url(source) or source.startswith("data:"):
        return source
    tried = [resolve_path(source, ctx.job_dir)]
    if ctx.aitk_root is not None and not Path(source).expanduser().is_absolute():
        tried.append(resolve_path(source, ctx.aitk_root))
    for path in tried:
        if path.is_file():
            return str(path)
    explained = any(_MISSING_IMAGE_HELP in p for p in ctx.problems)
    ctx.problems.append(f"{where}: file not found: " + (str(tried[0]) if len(tried) == 1 else
                                                         f"tried {', '.join(str(p) for p in tried)}")
                        + ("" if explained else _MISSING_IMAGE_HELP))
    return None


def _spec(mid: str, parity: str, sample: AitkSample, options: AitkOptions, lora: LoraSpec | None,
          controls: tuple[ControlImage, ...], base: str | None = None) -> RenderSpec:
    return RenderSpec(model=mid, parity=parity, prompt=sample.prompt, neg=sample.neg, width=sample.width,
                      height=sample.height, seed=sample.seed, sample_steps=sample.sample_steps,
                      guidance_scale=sample.guidance_scale, lora=lora, control_images=controls, aitk=options,
                      base=base)


def _spec_problems(where: str, mid: str, sample: AitkSample, controls: tuple[ControlImage, ...]) -> list[str]:
    """What previewd itself cannot render, said where the config says it."""
    try:
        lora = LoraSpec(path=".", network_multiplier=sample.network_multiplier)
        spec = _spec(mid, "aitk", sample, AitkOptions(), lora, controls)
    except ValidationError as exc:
        return format_validation_error(exc, RenderSpec, where=where)
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
        controls, failed = resolver.resolve(sample.where, sample.control)
        problems += failed
        lora = None if lora_path is None else LoraSpec(
            path=lora_path, network_multiplier=sample.network_multiplier, sha256=lora_sha256)
        renders.append((sample.index, _spec(job.model, parity, sample, job.aitk, lora, tuple(controls), job.base)))
    if problems:
        hint = next((i for i, p in enumerate(problems) if "allowed roots" in p), None)
        if hint is not None:
            problems[hint] += _OUTSIDE_ROOTS_HELP
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
    gaps = [job.base_gap] if job.base_gap else []
    gaps += job.quantization_gaps
    if s["save_dtype"] not in (None, "fp32", "float32"):
        gaps.append(f"checkpoints are saved in {s['save_dtype']}; ai-toolkit samples with the live training "
                    "weights, previewd with the saved ones")
    return gaps
