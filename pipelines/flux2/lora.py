"""ai-toolkit FLUX.2 LoRAs (BFL module names) merged into diffusers' Flux2Transformer2DModel weights.

The merge is ai-toolkit's `merge_in`: W = (W.float() + m * (B.float() @ A.float()) * scale).to(dtype),
with the delta computed on the BFL module's shape (fused qkv) and then cut into diffusers' modules.
Switching checkpoints or multipliers reads only the touched base weights back from the model files, so
they come back bit for bit without reloading the model or keeping a copy of them in host memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from previewd.errors import LoraError
from previewd.pipelines.base_weights import BaseWeights

_PREFIXES = ("diffusion_model.", "transformer.")
_LORA_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_down.weight": "down",
    ".lora_B.weight": "up", ".lora_up.weight": "up",
    ".alpha": "alpha",
}
_OTHER_TYPES = {"lokr_": "LoKr", "hada_": "LoHa", "dora_scale": "DoRA", "oft_": "OFT", ".diff": "full-weight diff",
                "lora_mid": "LoCon (Tucker)"}

# BFL sub-module -> diffusers sub-module(s) (row chunks in order), within double / single blocks.
_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
_SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
_GLOBAL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
    "final_layer.linear": ("proj_out",),
}
# BFL's final modulation is (shift, scale); diffusers' norm_out is (scale, shift).
_SWAPPED_HALVES = {"final_layer.adaLN_modulation.1": "norm_out.linear"}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LoraTarget:
    """Where one LoRA module's delta goes: diffusers weight names, one per equal row chunk."""

    params: tuple[str, ...]
    swap_halves: bool = False


def resolve_target(module: str, param_names: set[str]) -> LoraTarget | None:
    """Map a LoRA module name (BFL, or already diffusers) to transformer weights; None if unknown."""
    if module in _SWAPPED_HALVES:
        return LoraTarget((_SWAPPED_HALVES[module] + ".weight",), swap_halves=True)
    targets = _GLOBAL.get(module)
    match = _BLOCK.match(module)
    if match:
        kind, index, sub = match.groups()
        table, prefix = (_DOUBLE, "transformer_blocks") if kind == "double_blocks" else (_SINGLE, "single_transformer_blocks")
        targets = tuple(f"{prefix}.{index}.{name}" for name in table.get(sub, ()))
    if not targets:
        targets = (module,)
    params = tuple(name + ".weight" for name in targets)
    return LoraTarget(params) if all(p in param_names for p in params) else None


@dataclass
class LoraModule:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def scale(self) -> float:
        # ai-toolkit writes no alpha for FLUX.2 (alpha = rank, scale 1); kohya-style files carry one.
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


def read_lora(path: str) -> dict[str, LoraModule]:
    """LoRA modules by module name (prefix stripped). Refuses anything that is not plain LoRA."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                for marker, kind in _OTHER_TYPES.items():
                    if marker in key:
                        raise LoraError(f"{path}: {kind} LoRAs are not supported (key {key!r}); "
                                        "only plain LoRA (lora_A/lora_B or lora_down/lora_up)")
                suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
                if suffix is None:
                    raise LoraError(f"{path}: key {key!r} is not a LoRA weight")
                module = key[: -len(suffix)]
                for prefix in _PREFIXES:
                    if module.startswith(prefix):
                        module = module[len(prefix):]
                        break
                parts.setdefault(module, {})[_LORA_SUFFIXES[suffix]] = handle.get_tensor(key)
    except LoraError:
        raise
    except Exception as exc:
        raise LoraError(f"{path}: cannot read as safetensors: {exc}") from exc
    if not parts:
        raise LoraError(f"{path}: contains no LoRA weights")
    modules = {}
    for module, tensors in parts.items():
        if "down" not in tensors or "up" not in tensors:
            raise LoraError(f"{path}: module {module!r} lacks its down (lora_A) or up (lora_B) weight")
        alpha = tensors.get("alpha")
        modules[module] = LoraModule(tensors["down"], tensors["up"], None if alpha is None else float(alpha))
    return modules


def linear_shapes(transformer) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear layer, by weight name; quantised layers (which may hold no `weight`
    parameter) included."""
    return {f"{name}.weight": (module.out_features, module.in_features)
            for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}


def plan_merge(modules: dict[str, LoraModule], transformer) -> dict[str, LoraTarget]:
    """Targets for every module; LoraError naming the modules that match nothing or mismatch in shape."""
    shapes = linear_shapes(transformer)
    plan, unmatched, misshaped = {}, [], []
    for module, lora in modules.items():
        target = resolve_target(module, set(shapes))
        if target is None:
            unmatched.append(module)
            continue
        rows = sum(shapes[p][0] for p in target.params)
        cols = {shapes[p][1] for p in target.params}
        if lora.up.shape[0] != rows or cols != {lora.down.shape[1]} or lora.up.shape[1] != lora.down.shape[0]:
            misshaped.append(f"{module} (down {tuple(lora.down.shape)}, up {tuple(lora.up.shape)})")
            continue
        plan[module] = target
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} module(s) match no FLUX.2 transformer weight: "
                        + ", ".join(sorted(unmatched)[:8]))
    if misshaped:
        problems.append("shape mismatch: " + ", ".join(sorted(misshaped)[:8]))
    if problems:
        raise LoraError("LoRA does not fit this FLUX.2 transformer: " + "; ".join(problems))
    return plan


def branch_pairs(modules: dict[str, LoraModule], transformer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) of the runtime branch of each diffusers Linear layer the LoRA touches: a fused BFL
    module's down is shared and its up cut into the diffusers layers' rows, as the merge cuts its delta."""
    shapes = linear_shapes(transformer)
    pairs = {}
    for module, target in plan_merge(modules, transformer).items():
        lora = modules[module]
        # alpha/rank folded into down in float32, as lora.normalize does for the Qwen family.
        down = lora.down if lora.scale == 1.0 else lora.down.float() * lora.scale
        up = torch.cat(lora.up.chunk(2, dim=0)[::-1]) if target.swap_halves else lora.up
        row = 0
        for name in target.params:
            rows = shapes[name][0]
            pairs[name.removesuffix(".weight")] = (down, up[row:row + rows])
            row += rows
    return pairs


class LoraMerger:
    """Merges one LoRA at a time into a transformer, restoring the base weights in between, bit for bit:
    read back from the model's safetensors files (only the touched tensors, as the Qwen path does), or,
    for a transformer with no files (built in memory), from copies of the touched weights on the CPU."""

    def __init__(self, transformer, base_weights: BaseWeights | None = None):
        self.transformer = transformer
        self._files = base_weights
        self._copies: dict[str, torch.Tensor] = {}
        """Without files only: pristine copies (on CPU) of every weight any LoRA has touched."""
        self._touched: set[str] = set()
        """Weights the merged LoRA changed since the last restore."""
        self.active: tuple | None = None

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base weights back, bit-identical, and forget the active LoRA."""
        if self._files is not None:
            self._files.restore(self.transformer, sorted(name.removesuffix(".weight") for name in self._touched))
        else:
            weights = dict(self.transformer.named_parameters())
            for name in self._touched:
                weights[name].copy_(self._copies[name])
        self._touched.clear()
        self.active = None

    @torch.no_grad()
    def apply(self, modules: dict[str, LoraModule], multiplier: float, identity: tuple) -> None:
        """Merge `modules` at `multiplier` onto the base weights (identity: what is now merged)."""
        plan = plan_merge(modules, self.transformer)
        self.restore()
        weights = dict(self.transformer.named_parameters())
        for module, target in plan.items():
            lora = modules[module]
            device = weights[target.params[0]].device
            delta = multiplier * (lora.up.to(device).float() @ lora.down.to(device).float()) * lora.scale
            if target.swap_halves:
                delta = torch.cat(delta.chunk(2, dim=0)[::-1])
            row = 0
            for name in target.params:
                weight = weights[name]
                if self._files is None and name not in self._copies:
                    self._copies[name] = weight.detach().to("cpu", copy=True)
                self._touched.add(name)
                rows = weight.shape[0]
                weight.copy_((weight.float() + delta[row:row + rows]).to(weight.dtype))
                row += rows
        self.active = identity
