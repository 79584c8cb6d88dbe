"""A request file dropped in the inbox: the reference server's request plus previewd blocks.

Seed when a prompt omits it: the reference server uses 42 + prompt index; ai-toolkit uses the
section seed for every prompt (walk_seed off). So `parity: reference` gives 42 + index and
`parity: aitk` gives 42, unless `aitk.walk_seed` is set, which applies ai-toolkit's rule with base 42
(aitk-sampling.md §B.2) in either profile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from previewd.errors import IntakeError
from previewd.intake.controls import ControlResolver, ResolveImage
from previewd.intake.paths import is_url, outside_roots_message, resolve_path, within
from previewd.intake.prompt_flags import PromptFlagError, aitk_seeds, floor_size, parse_prompt_flags
from previewd.catalog import validate_spec
from previewd.intake.paths import PICKLED_SUFFIXES
from previewd.validation_errors import format_validation_error
from previewd.spec import (CONTROL_SLOTS, DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, MAX_GUIDANCE,
                           MAX_MULTIPLIER, MAX_SIDE, MAX_STEPS, MIN_SIDE, MODEL_IDS, AitkOptions, LoraSpec,
                           ModelId, Parity, RenderSpec)

KIND = "request"
DEFAULT_SIZE = 1024


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
    """previewd extension (ai-toolkit's per-sample multiplier); overrides loras[0].network_multiplier."""


class LoraIn(_Strict):
    path: str
    network_multiplier: float | None = Field(None, ge=-MAX_MULTIPLIER, le=MAX_MULTIPLIER)
    transformer: None = None

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


class OutputIn(_Strict):
    dir: str | None = None
    format: Literal["png", "jpg"] | None = None
    """None: the configured default format."""


class RequestIn(_Strict):
    model: ModelId
    trigger_word: str | None = None
    prompts: list[PromptIn] = Field(min_length=1)
    loras: list[LoraIn] = Field(default_factory=list, max_length=1)
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


def format_errors(exc: ValidationError, model: type[BaseModel] = RequestIn) -> list[str]:
    """pydantic errors as "dotted.loc: message (got value)", with a hint for misspelt keys."""
    return format_validation_error(exc, model, explain=_explain)


def _explain(err: ErrorDetails) -> str | None:
    """What the reference server's own words are for errors a request shares with it."""
    if err["type"] == "too_long" and err["loc"] == ("loras",):
        return "only one LoRA per request (reference server SINGLE_LORA_ONLY)"
    if err["type"] == "literal_error" and err["loc"] == ("model",):
        return f"unknown model id (known: {', '.join(MODEL_IDS)})"
    return None


def _load(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text)
    return yaml.safe_load(text)


def read_request(path: Path, *, allowed_roots: list[Path], default_parity: Parity = "aitk",
                 resolve_image: ResolveImage) -> RequestPlan:
    """Validate a request file into RenderSpecs; raises IntakeError(path, "request", every problem).

    Relative paths are read from the request's folder; every path it names must lie within
    `allowed_roots` (a trusted caller such as `previewd render` may pass [Path("/")]).
    """
    path = Path(path)
    try:
        data = _load(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise IntakeError(path, KIND, [f"file: cannot read: {exc}"]) from None
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

    lora = None
    if req.loras:
        lora = _lora(req.loras[0], base_dir, allowed_roots, problems)
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
                          lora_merged=req.aitk.lora_merged)

    renders = []
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
        multiplier = settings.pop("network_multiplier")
        spec_lora = None
        if lora is not None:
            if multiplier is not None:
                spec_lora = lora.model_copy(update={"network_multiplier": multiplier})
            else:
                spec_lora = lora
        elif multiplier is not None:
            warnings.append(f"{where}.network_multiplier: no LoRA in the request, ignored")
        try:
            spec = RenderSpec(model=req.model, parity=parity, lora=spec_lora, control_images=tuple(controls),
                              aitk=options, **settings)
        except ValidationError as exc:
            problems += [f"{where}.{line}" for line in format_errors(exc, RenderSpec)]
            continue
        problems += [f"{where}.{p}" for p in validate_spec(spec)]
        renders.append((i, spec))
    if problems:
        raise IntakeError(path, KIND, problems)
    return RequestPlan(path=path, name=path.stem, renders=renders, output_dir=output_dir,
                       output_format=req.output.format, parity=parity, warnings=warnings)


def _lora(item: LoraIn, base_dir: Path, roots: list[Path], problems: list[str]) -> LoraSpec | None:
    where = "loras.0.path"
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
    multiplier = item.network_multiplier if item.network_multiplier is not None else 1.0
    return LoraSpec(path=str(lora_path), network_multiplier=multiplier)


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
