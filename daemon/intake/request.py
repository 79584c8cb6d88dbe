"""A request file dropped in the inbox: the reference server's request plus previewd blocks.

Seed when a prompt omits it: the reference server uses 42 + prompt index; ai-toolkit uses the
section seed for every prompt (walk_seed off). So `parity: reference` gives 42 + index and
`parity: aitk` gives 42, unless `aitk.walk_seed` is set, which applies ai-toolkit's rule with base 42
(aitk-sampling.md §B.2) in either profile.

Sweeps (previewd's X/Y/Z plot): several `loras` are compared side by side, one grid row each,
never stacked (the reference server takes one, SINGLE_LORA_ONLY); `network_multipliers` lists
strengths, per LoRA or for all of them; `seeds` lists seeds for every prompt or for one. Every
combination is rendered once: LoRA, then strength (the costly switches, outermost), then prompt,
then seed. A request without these lists reads exactly as the reference server's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from previewd.config import LimitsConfig
from previewd.errors import IntakeError
from previewd.intake.controls import ControlResolver, ResolveImage
from previewd.intake.paths import is_url, outside_roots_message, resolve_path, within
from previewd.intake.prompt_flags import PromptFlagError, aitk_seeds, floor_size, parse_prompt_flags
from previewd.intake.quantization import REPRODUCED, find_adapter, split_qtype
from previewd.catalog import validate_spec
from previewd.intake.paths import PICKLED_SUFFIXES
from previewd.safe_files import parse_json, parse_yaml, read_text, why_unreadable
from previewd.validation_errors import format_validation_error
from previewd.spec import (CONTROL_SLOTS, DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, MAX_GUIDANCE,
                           MAX_MULTIPLIER, MAX_SIDE, MAX_STEPS, MIN_SIDE, MODEL_IDS, AitkOptions, LoraSpec,
                           ModelId, Parity, RenderSpec)

KIND = "request"
DEFAULT_SIZE = 1024
MAX_LORAS = 64
MAX_RENDERS = 2048
"""Renders one request may ask for, sweeps multiplied out."""

Multiplier = Annotated[float, Field(ge=-MAX_MULTIPLIER, le=MAX_MULTIPLIER)]
Seed = Annotated[int, Field(ge=0)]


def _distinct(values):
    if isinstance(values, list) and len(set(values)) != len(values):
        raise ValueError("lists a value twice")
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptIn(_Strict):
    prompt: str
    trigger_word: str | None = None
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE)
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE)
    seed: int | None = Field(None, ge=-1)
    sample_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE)
    neg: str | None = None
    sampler: str | None = None
    """Accepted for compatibility; neither ai-toolkit (qwen/flux2) nor the reference server reads it."""
    ctrl_img: str | None = None
    ctrl_img_1: str | None = None
    ctrl_img_2: str | None = None
    ctrl_img_3: str | None = None
    network_multiplier: float | None = Field(None, ge=-MAX_MULTIPLIER, le=MAX_MULTIPLIER)
    """previewd extension (ai-toolkit's per-sample multiplier); overrides the LoRAs' multipliers."""
    seeds: list[Seed] | None = Field(None, min_length=1)
    """previewd extension: render this prompt once per seed (a seed sweep)."""

    _seeds = field_validator("seeds")(_distinct)

    @model_validator(mode="after")
    def _one_seed_field(self) -> "PromptIn":
        if self.seed is not None and self.seeds is not None:
            raise ValueError("give `seed` or `seeds`, not both")
        return self


class LoraIn(_Strict):
    path: str
    network_multiplier: float | None = Field(None, ge=-MAX_MULTIPLIER, le=MAX_MULTIPLIER)
    network_multipliers: list[Multiplier] | None = Field(None, min_length=1)
    """previewd extension: render this LoRA once per multiplier (a strength sweep)."""
    transformer: None = None

    _multipliers = field_validator("network_multipliers")(_distinct)

    @model_validator(mode="after")
    def _one_multiplier_field(self) -> "LoraIn":
        if self.network_multiplier is not None and self.network_multipliers is not None:
            raise ValueError("give `network_multiplier` or `network_multipliers`, not both")
        return self

    @field_validator("transformer", mode="before")
    @classmethod
    def _no_moe(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("MoE LoRA halves (low/high) do not apply to these models; leave it null")
        return value


class AitkIn(_Strict):
    do_cfg_norm: bool = False
    vae_tiling: bool = False
    lora_merged: bool = True
    parse_prompt_flags: bool = False
    """Apply ai-toolkit's strip() and `--flag` parsing to each prompt (off: the text is used as is)."""
    walk_seed: bool | None = None
    quantize: bool = False
    """Render on a quantised transformer, as a run with `model.quantize` (the LoRA then runs unmerged)."""
    qtype: str = "qfloat8"
    """As ai-toolkit's `model.qtype`: qfloat8 or uint2..uint8, optionally `|<accuracy recovery adapter>`
    (a file, relative to the request, or `user/repo/file.safetensors` in the local Hugging Face cache)."""
    quantize_te: bool | None = None
    """Quantise the text encoder to `qtype_te`; not given: as `quantize` when that is set (ai-toolkit's
    default), else the configured `models.<id>.quantize_text_encoder`."""
    qtype_te: str = "qfloat8"
    """FLUX.2 quantises its text encoder with `qtype`, as ai-toolkit does."""


class OutputIn(_Strict):
    dir: str | None = None
    format: Literal["png", "jpg"] | None = None
    """None: the configured default format."""


class RequestIn(_Strict):
    model: ModelId
    trigger_word: str | None = None
    prompts: list[PromptIn] = Field(min_length=1)
    loras: list[LoraIn] = Field(default_factory=list, max_length=MAX_LORAS)
    network_multipliers: list[Multiplier] | None = Field(None, min_length=1)
    """previewd extension: the multipliers of every LoRA that names none."""
    seeds: list[Seed] | None = Field(None, min_length=1)
    """previewd extension: render every prompt that names no `seed` once per seed."""

    _lists = field_validator("network_multipliers", "seeds")(_distinct)
    parity: Parity | None = None
    aitk: AitkIn = AitkIn()
    output: OutputIn = OutputIn()


@dataclass(frozen=True)
class RequestPlan:
    path: Path
    name: str
    """The request file's stem."""
    renders: list[tuple[int, RenderSpec]]
    """(prompt index, spec); specs without a LoRA render the base model."""
    output_dir: Path | None
    output_format: Literal["png", "jpg"] | None
    """None when the request does not say (the caller's configured default applies)."""
    parity: Parity
    warnings: list[str] = field(default_factory=list)
    swept: frozenset[str] = frozenset()
    """The axes the request sweeps beyond LoRAs and prompts: "strength", "seed"."""


def format_errors(exc: ValidationError, model: type[BaseModel] = RequestIn) -> list[str]:
    """pydantic errors as "dotted.loc: message (got value)", with a hint for misspelt keys."""
    return format_validation_error(exc, model, explain=_explain)


def _explain(err: ErrorDetails) -> str | None:
    """What the reference server's own words are for errors a request shares with it."""
    if err["type"] == "too_long" and err["loc"] == ("loras",):
        return f"at most {MAX_LORAS} LoRAs per request (each is a row of the grid, not stacked)"
    if err["loc"][-1:] in (("network_multiplier",), ("seed",)) and isinstance(err["input"], list):
        return f"one value; to sweep several, name the list {err['loc'][-1]}s"
    if err["type"] == "literal_error" and err["loc"] == ("model",):
        return f"unknown model id (known: {', '.join(MODEL_IDS)})"
    return None


def _load(path: Path, roots: list[Path], limits: LimitsConfig) -> Any:
    """The parsed file, read within `roots` and `limits` (previewd.safe_files)."""
    text = read_text(path, roots, limits)
    if path.suffix.lower() == ".json":
        return parse_json(text, limits)
    return parse_yaml(text, limits)


def read_request(path: Path, *, allowed_roots: list[Path], default_parity: Parity = "aitk",
                 resolve_image: ResolveImage, limits: LimitsConfig = LimitsConfig()) -> RequestPlan:
    """Validate a request file into RenderSpecs; raises IntakeError(path, "request", every problem).

    Relative paths are read from the request's folder; every path it names must lie within
    `allowed_roots` (a trusted caller such as `previewd render` may pass [Path("/")]).
    """
    path = Path(path)
    try:
        data = _load(path, allowed_roots, limits)
    except (OSError, UnicodeDecodeError) as exc:
        raise IntakeError(path, KIND, [f"file: cannot read: {why_unreadable(exc)}"]) from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise IntakeError(path, KIND, [f"syntax: {exc}"]) from None
    if not isinstance(data, dict):
        raise IntakeError(path, KIND, [f"(top level): expected a mapping with model, prompts, loras; "
                                       f"got {type(data).__name__}"])
    try:
        req = RequestIn.model_validate(data)
    except ValidationError as exc:
        raise IntakeError(path, KIND, format_errors(exc)) from None

    base_dir = path.parent.resolve()
    parity: Parity = req.parity or default_parity
    problems: list[str] = []
    warnings: list[str] = []

    loras = _loras(req, base_dir, allowed_roots, problems)
    output_dir = None
    if req.output.dir is not None:
        output_dir = resolve_path(req.output.dir, base_dir)
        if not within(output_dir, allowed_roots):
            problems.append(f"output.dir: {outside_roots_message(output_dir, allowed_roots)}")

    if req.aitk.walk_seed is not None:
        seeds = aitk_seeds(DEFAULT_SEED, req.aitk.walk_seed, [p.seed for p in req.prompts])
    elif parity == "reference":
        seeds = [p.seed if p.seed is not None else DEFAULT_SEED + i for i, p in enumerate(req.prompts)]
    else:
        seeds = [p.seed if p.seed is not None else DEFAULT_SEED for p in req.prompts]
    options = AitkOptions(do_cfg_norm=req.aitk.do_cfg_norm, vae_tiling=req.aitk.vae_tiling,
                          # ai-toolkit never merges a LoRA into a quantised model.
                          lora_merged=req.aitk.lora_merged and not req.aitk.quantize,
                          **_quantization(req, base_dir, allowed_roots, problems, warnings))

    planned: list[tuple[int, RenderSpec, float | None, list[int]]] = []
    resolver = ControlResolver(resolve_image, base_dir)
    for i, item in enumerate(req.prompts):
        where = f"prompts.{i}"
        settings = _prompt_settings(item, req.trigger_word, req.aitk.parse_prompt_flags, seeds[i], where, problems)
        if settings is None:
            continue
        flag_ctrl = settings.pop("ctrl_img", None)
        sources = {slot: getattr(item, slot) for slot in CONTROL_SLOTS}
        if flag_ctrl is not None:
            sources["ctrl_img"] = flag_ctrl
        controls, failed = resolver.resolve(where, sources.items())
        problems += failed
        if failed:
            # validate_spec would only repeat "requires a control image" for the one that failed.
            continue
        override = settings.pop("network_multiplier")
        if override is not None and not loras:
            warnings.append(f"{where}.network_multiplier: no LoRA in the request, ignored")
        own_seed = settings.pop("seed")
        prompt_seeds = item.seeds or (req.seeds if item.seed is None else None) or [own_seed]
        try:
            spec = RenderSpec(model=req.model, parity=parity, control_images=tuple(controls), aitk=options,
                              seed=prompt_seeds[0], **settings)
        except ValidationError as exc:
            problems += [f"{where}.{line}" for line in format_errors(exc, RenderSpec)]
            continue
        problems += [f"{where}.{p}" for p in validate_spec(spec)]
        planned.append((i, spec, override, prompt_seeds))
    renders = [(i, spec.model_copy(update={"seed": seed, "lora": lora and lora.model_copy(
                   update={"network_multiplier": override if override is not None else strength})}))
               for lora, strengths in loras or [(None, [None])] for strength in strengths
               for i, spec, override, prompt_seeds in planned for seed in prompt_seeds]
    # Each combination once: a prompt's own multiplier collapses the strengths it overrides.
    renders = list({(i, spec.model_dump_json()): (i, spec) for i, spec in renders}.values())
    if len(renders) > MAX_RENDERS:
        problems.append(f"(sweep): {len(renders)} renders; at most {MAX_RENDERS} per request")
    if problems:
        raise IntakeError(path, KIND, problems)
    swept = {axis for axis, many in (("strength", any(len(s) > 1 for _lora, s in loras)),
                                     ("seed", any(len(p[3]) > 1 for p in planned))) if many}
    return RequestPlan(path=path, name=path.stem, renders=renders, output_dir=output_dir,
                       output_format=req.output.format, parity=parity, warnings=warnings,
                       swept=frozenset(swept))


def _loras(req: RequestIn, base_dir: Path, roots: list[Path], problems: list[str]) -> list[tuple[LoraSpec, list[float]]]:
    """Each LoRA with the multipliers it is rendered at."""
    loras = []
    names: dict[str, int] = {}
    for index, item in enumerate(req.loras):
        lora = _lora(item, index, base_dir, roots, problems)
        if lora is None:
            continue
        name = Path(lora.path).name
        if name in names:
            problems.append(f"loras.{index}.path: the same file name as loras.{names[name]} ({name}); each LoRA "
                            f"is a row named after its file, so give them distinct names")
            continue
        names[name] = index
        if item.network_multipliers is not None:
            multipliers = item.network_multipliers
        elif item.network_multiplier is not None:
            multipliers = [item.network_multiplier]
        else:
            multipliers = req.network_multipliers or [1.0]
        loras.append((lora, multipliers))
    return loras


def _quantization(req: RequestIn, base_dir: Path, roots: list[Path], problems: list[str],
                  warnings: list[str]) -> dict[str, Any]:
    """AitkOptions fields for the `aitk:` block's quantisation, read as ai-toolkit reads a run's."""
    block = req.aitk
    qtype, adapter = split_qtype(block.qtype)
    qtype_te = block.qtype_te
    if req.model == "flux2":
        if "qtype_te" in block.model_fields_set and qtype_te != qtype:
            warnings.append(f"aitk.qtype_te: FLUX.2 quantises its text encoder with qtype ({qtype}), as "
                            f"ai-toolkit does; qtype_te is ignored")
        qtype_te = qtype
    quantize_te = block.quantize_te if block.quantize_te is not None else (True if block.quantize else None)
    options: dict[str, Any] = {}
    if block.quantize:
        if qtype not in REPRODUCED:
            problems.append(f"aitk.qtype: {qtype!r} is not a quantisation previewd reproduces "
                            f"({', '.join(REPRODUCED)})")
        else:
            options.update(quantize=True, qtype=qtype)
        if adapter is not None:
            options["ara"], problem = find_adapter(adapter, [base_dir])
            if problem is None and Path(options["ara"]).is_absolute() and not within(Path(options["ara"]), roots):
                problem = outside_roots_message(Path(options["ara"]), roots)
            if problem is not None:
                problems.append(f"aitk.qtype: {problem}")
    if quantize_te and qtype_te not in REPRODUCED:
        problems.append(f"aitk.qtype_te: {qtype_te!r} is not a quantisation previewd reproduces "
                        f"({', '.join(REPRODUCED)})")
    elif quantize_te is not None:
        options.update(quantize_te=quantize_te, qtype_te=qtype_te)
    return options


def _lora(item: LoraIn, index: int, base_dir: Path, roots: list[Path], problems: list[str]) -> LoraSpec | None:
    where = f"loras.{index}.path"
    if is_url(item.path):
        problems.append(f"{where}: URLs are not downloaded; put the file in the inbox and name its path")
        return None
    lora_path = resolve_path(item.path, base_dir)
    suffix = lora_path.suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        problems.append(f"{where}: {lora_path.name} is a pickled checkpoint ({suffix}); previewd never loads "
                        f"pickles, convert it to .safetensors")
        return None
    if suffix != ".safetensors":
        problems.append(f"{where}: {lora_path.name} is not a .safetensors file")
        return None
    if not within(lora_path, roots):
        problems.append(f"{where}: {outside_roots_message(lora_path, roots)}")
        return None
    if not lora_path.is_file():
        problems.append(f"{where}: file not found: {lora_path}")
        return None
    return LoraSpec(path=str(lora_path))


def _prompt_settings(item: PromptIn, trigger_word: str | None, parse_flags: bool, seed: int, where: str,
                     problems: list[str]) -> dict[str, Any] | None:
    """RenderSpec fields of one prompt (plus `ctrl_img` from a flag and `network_multiplier`)."""
    text = item.prompt
    trigger = item.trigger_word or trigger_word
    if trigger:
        # The reference server replaces only [trigger]; [name] has no meaning outside a job config.
        text = text.replace("[trigger]", trigger)
    settings: dict[str, Any] = {
        "prompt": text, "neg": item.neg if item.neg is not None else "",
        "width": item.width or DEFAULT_SIZE, "height": item.height or DEFAULT_SIZE, "seed": seed,
        "sample_steps": item.sample_steps or DEFAULT_STEPS,
        "guidance_scale": item.guidance_scale if item.guidance_scale is not None else DEFAULT_GUIDANCE,
        "network_multiplier": item.network_multiplier, "ctrl_img": None,
    }
    if not parse_flags:
        return settings
    try:
        flags = parse_prompt_flags(text)
    except PromptFlagError as exc:
        problems.append(f"{where}.prompt: {exc}")
        return None
    settings["prompt"] = flags.prompt
    for name in ("neg", "width", "height", "seed", "sample_steps", "guidance_scale", "network_multiplier",
                 "ctrl_img"):
        value = getattr(flags, name)
        if value is not None:
            settings[name] = value
    settings["width"], settings["height"] = floor_size(settings["width"]), floor_size(settings["height"])
    return settings
