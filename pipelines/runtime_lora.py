"""LoRA-shaped branches computed at run time beside a model's Linear layers, as ai-toolkit computes them.

ai-toolkit never merges a LoRA into a quantised model; `ToolkitModuleMixin.forward` adds it to each
layer's output instead (aitk-quantized.md §3):

    y = base(x);  lx = up(down(x.to(branch dtype)));  y = y + (lx * multiplier).to(y.dtype)

The trained LoRA runs in float32, so in a bfloat16 run its term is rounded once to bfloat16 and then
added (peft instead adds in float32 and rounds the sum: a last-bit difference that grows over a run).
An accuracy recovery adapter runs the same way in the run dtype, always on, and comes first on the
layers both cover: y = (base + ARA) + LoRA.

Branches are forward hooks, so module names, parameters and the base layers stay as they are; their
matrices are non-persistent buffers of the layer, so they follow it between devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from previewd.spec import LoraSpec

Pair = tuple[torch.Tensor, torch.Tensor]
"""(down, up) of one layer: lora_A [rank, in] and lora_B [out, rank]."""


def _device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()))
    return tensor.device


class BranchSet:
    """One adapter's branches over a model's layers (a trained LoRA, or an ARA)."""

    def __init__(self, model: nn.Module, name: str, dtype: torch.dtype):
        self.model = model
        self.name = name
        self.dtype = dtype
        """What the branch computes in: float32 for a trained LoRA, the run dtype for an ARA."""
        self.multiplier = 1.0
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._shapes: dict[str, tuple[torch.Size, torch.Size]] = {}

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(sorted(self._hooks))

    def load(self, pairs: Mapping[str, Pair], multiplier: float = 1.0) -> str:
        """Carry exactly `pairs` (module name -> (down, up)); "copied" when they took the place of
        same-shaped branches in place, "attached" when hooks were (re)made."""
        shapes = {name: (down.shape, up.shape) for name, (down, up) in pairs.items()}
        how = "copied" if shapes == self._shapes else "attached"
        if how == "attached":
            self.clear()
        with torch.no_grad():
            for name, (down, up) in pairs.items():
                module = self.model.get_submodule(name)
                if how == "copied":
                    getattr(module, f"{self.name}_down").copy_(down)
                    getattr(module, f"{self.name}_up").copy_(up)
                    continue
                device = _device(module)
                module.register_buffer(f"{self.name}_down", down.to(device, self.dtype), persistent=False)
                module.register_buffer(f"{self.name}_up", up.to(device, self.dtype), persistent=False)
                self._hooks[name] = module.register_forward_hook(self._hook)
        self._shapes = shapes
        self.multiplier = multiplier
        return how

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0:  # ai-toolkit skips the branch at multiplier 0
            return output
        down, up = getattr(module, f"{self.name}_down"), getattr(module, f"{self.name}_up")
        x = args[0]
        # Offload hooks may bring the layer to the device without these buffers (they were added later).
        down, up = down.to(x.device), up.to(x.device)
        lx = F.linear(F.linear(x.to(down.dtype), down), up)
        return output + (lx * self.multiplier).to(output.dtype)

    def clear(self) -> None:
        for name, handle in self._hooks.items():
            handle.remove()
            module = self.model.get_submodule(name)
            delattr(module, f"{self.name}_down")
            delattr(module, f"{self.name}_up")
        self._hooks.clear()
        self._shapes = {}


class RuntimeLora:
    """The trained LoRA as ai-toolkit samples a quantised or unmerged run: a float32 branch. A new
    checkpoint over the same layers and ranks is copied into the branch in place, so switching between
    a run's checkpoints re-creates nothing and restores nothing."""

    def __init__(self, model: nn.Module, read: Callable[[str], dict[str, Pair]]):
        self.branches = BranchSet(model, "lora", torch.float32)
        self._read = read
        """LoRA file -> (down, up) per Linear layer of `model`."""
        self._key: tuple | None = None

    def apply(self, spec: LoraSpec | None) -> dict[str, Any] | None:
        """Carry exactly `spec` (or nothing), and say how."""
        if spec is None:
            self.clear()
            return None
        stat = os.stat(spec.path)
        key = (os.path.realpath(spec.path), stat.st_size, stat.st_mtime_ns, spec.sha256)
        swap = "kept"
        if key != self._key:
            self._key = None
            swap = self.branches.load(self._read(spec.path))
            self._key = key
        self.branches.multiplier = spec.network_multiplier
        return {"path": spec.path, "sha256": spec.sha256, "network_multiplier": spec.network_multiplier,
                "mode": "branch", "branch": "float32, cast to the layer's dtype, added after it (ai-toolkit)",
                "modules": len(self.branches.modules), "swap": swap}

    def clear(self) -> None:
        self.branches.clear()
        self._key = None
