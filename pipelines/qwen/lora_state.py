"""The one LoRA a loaded Qwen pipeline carries, and how it changes between renders.

The transformer carries no LoRA, or exactly one peft adapter named `ADAPTER`, either fused into the
weights (`fused_at` is its scale) or applied at run time. Each adapter is loaded prepared for
hot-swapping (`enable_lora_hotswap`, its rank as the target), so a later checkpoint over the same
layers and of no higher rank is swapped into it in place (no new modules, nothing to recompile);
anything else is unloaded and loaded. The base model is never reloaded. Unfusing does not subtract
the merge: it reads the touched weights back from the model files (base_weights), so no bfloat16
rounding residue accumulates over checkpoint switches, and tells peft the adapter is unmerged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from previewd.errors import LoraError, PipelineError
from previewd.pipelines.base_weights import BaseWeights
from previewd.pipelines.lora import LoraWeights, linear_module_names, load_lora
from previewd.pipelines.model_sources import resolve_source
from previewd.spec import LoraSpec

logger = logging.getLogger(__name__)

ADAPTER = "preview"

LoraMode = Literal["fuse", "adapter"]


@dataclass
class _LoadedLora:
    key: tuple
    path: str
    sha256: str | None
    modules: tuple[str, ...]
    rank: int
    """The rank the adapter is padded to: the most a checkpoint may have to be swapped into it."""
    weights_info: dict[str, Any]
    fused_at: float | None = None
    scale: float | None = None


class QwenLoraState:
    """Puts exactly the requested LoRA (or none) onto `pipe.transformer`, fused or as an adapter."""

    def __init__(self, pipe, *, model_id: str, source_path: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.source_path = source_path
        self.module_names: set[str] = linear_module_names(pipe.transformer)
        self._lora: _LoadedLora | None = None
        self._base_weights: BaseWeights | None | bool = False  # False: not looked up yet

    def apply(self, spec: LoraSpec | None, mode: LoraMode = "fuse") -> dict[str, Any] | None:
        """Make the transformer carry exactly `spec` (or no LoRA), fused or as an adapter, and say how."""
        if spec is None:
            self._drop()
            return None
        stat = os.stat(spec.path)
        key = (os.path.realpath(spec.path), stat.st_size, stat.st_mtime_ns, spec.sha256)
        if self._lora is None or self._lora.key != key:
            self._install(spec, key)
        self._set_scale(float(spec.network_multiplier), mode)
        return {"path": spec.path, "sha256": spec.sha256, "network_multiplier": spec.network_multiplier,
                "mode": mode, **self._lora.weights_info}

    def _unfuse(self, lora: _LoadedLora) -> None:
        """Read the touched weights back from the model files, so no rounding residue of the merge
        survives (it accumulates over checkpoint switches in bf16); subtracting the merge first would
        be overwritten anyway. Without files, peft's unfuse (a subtraction) is all there is."""
        if self._base_weights is False:
            self._base_weights = BaseWeights.find(resolve_source(self.source_path) / "transformer")
            if self._base_weights is None:
                logger.warning("%s: no safetensors transformer files to restore from; unfusing leaves a "
                               "rounding residue", self.source_path)
        if self._base_weights is None:
            self.pipe.unfuse_lora()
        else:
            self._base_weights.restore(self.pipe.transformer, lora.modules)
            _forget_merge(self.pipe, ADAPTER)
        lora.fused_at = None

    def _drop(self) -> None:
        if self._lora is None:
            return
        if self._lora.fused_at is not None:
            self._unfuse(self._lora)
        self.pipe.delete_adapters(ADAPTER)
        self._lora = None

    def _install(self, spec: LoraSpec, key: tuple) -> None:
        weights: LoraWeights = load_lora(spec.path, module_names=self.module_names)
        if weights.unmatched:
            logger.warning("%s: %d LoRA module(s) match nothing in %s and are skipped: %s", spec.path,
                           len(weights.unmatched), self.model_id, ", ".join(weights.unmatched[:5]))
        previous = self._lora
        if previous is not None and previous.fused_at is not None:
            self._unfuse(previous)
        method = "load"
        rank = max(weights.ranks.values())
        if previous is not None and previous.modules == tuple(weights.modules) and rank <= previous.rank:
            try:
                self.pipe.load_lora_weights(dict(weights.state_dict), adapter_name=ADAPTER, hotswap=True)
                method = "hotswap"
            except (RuntimeError, ValueError) as exc:
                logger.warning("%s: hot-swap failed (%s); unloading and loading instead", spec.path, exc)
        if method == "load":
            self._lora = None
            if previous is not None:
                self.pipe.delete_adapters(ADAPTER)
            # Before the adapter exists, so that it is built for hot-swapping (diffusers' requirement).
            self.pipe.enable_lora_hotswap(target_rank=rank)
            try:
                self.pipe.load_lora_weights(dict(weights.state_dict), adapter_name=ADAPTER)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise LoraError(f"{spec.path}: cannot be applied to {self.model_id} ({exc})") from exc
        adapters = self.pipe.get_list_adapters().get("transformer", [])
        if ADAPTER not in adapters:
            self._lora = None
            raise PipelineError(f"{spec.path}: the LoRA did not attach to the transformer")
        self._lora = _LoadedLora(
            key=key, path=spec.path, sha256=spec.sha256, modules=tuple(weights.modules),
            rank=rank if method == "load" else previous.rank,
            weights_info={"modules": len(weights.modules), "unmatched": list(weights.unmatched),
                          "ranks": sorted(set(weights.ranks.values())), "format": weights.source_format,
                          "alpha_folded": weights.alpha_folded, "swap": method})

    def _set_scale(self, scale: float, mode: LoraMode) -> None:
        lora = self._lora
        if mode == "adapter":
            if lora.fused_at is not None:
                self._unfuse(lora)
            if lora.scale != scale:
                self.pipe.set_adapters([ADAPTER], [scale])
                lora.scale = scale
            return
        if lora.fused_at == scale:
            return
        if lora.fused_at is not None:
            self._unfuse(lora)
        # unfuse leaves peft's scaling at the last fuse scale (tiny-models-cpu.md E9): reset it first.
        self.pipe.set_adapters([ADAPTER], [1.0])
        self.pipe.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
        lora.fused_at = scale
        lora.scale = scale


def _forget_merge(pipe, adapter: str) -> None:
    """Tell peft and diffusers that `adapter` is no longer merged, as `unfuse_lora` would after
    subtracting it: the base weights were put back another way."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in pipe.transformer.modules():
        if isinstance(module, BaseTunerLayer) and adapter in module.merged_adapters:
            module.merged_adapters.remove(adapter)
    pipe._merged_adapters = pipe._merged_adapters - {adapter}
