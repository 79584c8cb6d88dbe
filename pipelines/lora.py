"""Reading LoRA files into one canonical form, shared by the model adapters.

Files are read with safetensors only (never pickle). Whatever the trainer wrote, the result is a
diffusers/peft state dict: `<prefix>.<module path>.lora_A.weight` / `.lora_B.weight`, with any
kohya `alpha` folded into `lora_A` (scale alpha/rank), so it loads with `network_alphas=None`.

Accepted layouts (aitk-sampling.md §D, tiny-models-cpu.md §6):
- ai-toolkit: `diffusion_model.<module>.lora_A/lora_B.weight`, no alpha;
- diffusers: `transformer.<module>.lora_A/lora_B.weight`;
- kohya: `lora_down/lora_up` (+ optional `.alpha`), dotted names or `lora_unet_`/`lora_transformer_`
  names with underscores, the latter resolved against the target model's module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from previewd.errors import LoraError
from previewd.lora_keys import LORA_ALPHA as _ALPHA, LORA_WEIGHT as _SUFFIX, UNSUPPORTED_TAGS as _UNSUPPORTED

_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "model.")
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_")


@dataclass
class LoraWeights:
    """A LoRA in canonical form, with what did not fit the target model."""

    state_dict: dict[str, torch.Tensor]
    """`<prefix>.<module>.lora_A.weight` / `.lora_B.weight`, ready for `load_lora_weights`."""
    modules: list[str]
    """Module paths (without prefix) the LoRA targets, sorted."""
    ranks: dict[str, int]
    unmatched: list[str] = field(default_factory=list)
    """Module paths that name no module of the target model (left out of `state_dict`)."""
    alpha_folded: bool = False
    source_format: str = "peft"
    metadata: dict[str, str] = field(default_factory=dict)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the header metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError as exc:
        raise LoraError(f"{path}: LoRA file not found") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, metadata


def _strip_prefix(module: str) -> str:
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):]
    return module


def _flat_lookup(module_names: set[str] | None) -> dict[str, str]:
    return {name.replace(".", "_"): name for name in module_names or ()}


def _resolve(raw: str, flat: dict[str, str]) -> str:
    for prefix in _FLAT_PREFIXES:
        if raw.startswith(prefix):
            stem = raw[len(prefix):]
            return flat.get(stem, stem)
    return _strip_prefix(raw)


def normalize(tensors: dict[str, torch.Tensor], *, module_names: set[str] | None = None,
              prefix: str = "transformer", source: str = "<memory>") -> LoraWeights:
    """Convert `tensors` to canonical peft keys under `prefix`.

    `module_names` are the target model's module paths; when given, LoRA modules that name none of
    them are listed in `unmatched`, and a LoRA that matches none at all is refused.
    """
    bad = sorted(k for k in tensors if any(tag in k for tag in _UNSUPPORTED))
    if bad:
        raise LoraError(f"{source}: unsupported LoRA variant (LoKr/LoHa/DoRA keys such as {bad[0]!r}); "
                        "only plain LoRA can be applied")
    flat = _flat_lookup(module_names)
    down: dict[str, torch.Tensor] = {}
    up: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    kohya = False
    ignored = []
    for key, tensor in tensors.items():
        if match := _SUFFIX.match(key):
            module = _resolve(match["module"], flat)
            kind = match["kind"]
            kohya |= kind in ("lora_down", "lora_up")
            (down if kind in ("lora_A", "lora_down") else up)[module] = tensor
        elif match := _ALPHA.match(key):
            alphas[_resolve(match["module"], flat)] = float(tensor.float().item())
        else:
            ignored.append(key)
    if ignored:
        raise LoraError(f"{source}: {len(ignored)} key(s) are not LoRA weights, e.g. {ignored[0]!r}")
    if not down:
        raise LoraError(f"{source}: no LoRA weights found (expected lora_A/lora_B or lora_down/lora_up keys)")
    halves = sorted(set(down) ^ set(up))
    if halves:
        raise LoraError(f"{source}: module {halves[0]!r} has only one of its two LoRA matrices")

    modules = sorted(down)
    unmatched = [] if module_names is None else [m for m in modules if m not in module_names]
    if modules and len(unmatched) == len(modules):
        raise LoraError(f"{source}: none of the {len(modules)} LoRA modules exists in this model "
                        f"(e.g. {modules[0]!r}); wrong base model or key format")
    state_dict: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    skipped = set(unmatched)
    for module in modules:
        if module in skipped:
            continue
        a, b = down[module], up[module]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{source}: {module!r} has incompatible LoRA shapes "
                            f"{tuple(a.shape)} / {tuple(b.shape)}")
        rank = a.shape[0]
        if module in alphas and alphas[module] != rank:
            # peft scales by alpha/rank; folding it into A (in float32, so no extra rounding) keeps
            # every file loadable without alphas.
            a = a.float() * (alphas[module] / rank)
        state_dict[f"{prefix}.{module}.lora_A.weight"] = a
        state_dict[f"{prefix}.{module}.lora_B.weight"] = b
        ranks[module] = rank
    return LoraWeights(state_dict=state_dict, modules=[m for m in modules if m not in skipped], ranks=ranks,
                       unmatched=unmatched, alpha_folded=bool(alphas), source_format="kohya" if kohya else "peft")


def load_lora(path: str | Path, *, module_names: set[str] | None = None,
              prefix: str = "transformer") -> LoraWeights:
    """Read and normalise the LoRA at `path` for a model whose modules are `module_names`."""
    tensors, metadata = read_safetensors(path)
    weights = normalize(tensors, module_names=module_names, prefix=prefix, source=str(path))
    weights.metadata = metadata
    return weights


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Paths of the Linear layers of `model`, the only layers these LoRAs target."""
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
