"""A model's original weights, read back from its safetensors files to undo in-place LoRA merges.

Unfusing a LoRA subtracts its delta again, which in bfloat16 leaves a rounding residue that grows
with every checkpoint switch (the tiny 2512 model drifted by 0.02 after ten switches: 9 pixel
levels). Reading just the touched tensors back from the memory-mapped files restores the base
bit for bit, without holding a second copy of the weights in RAM.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from previewd.errors import PipelineError


class BaseWeights:
    def __init__(self, where: dict[str, Path]):
        self._where = where

    @classmethod
    def find(cls, folder: Path) -> BaseWeights | None:
        """The tensors of a diffusers model folder (single file or sharded); None without safetensors."""
        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls({key: folder / name for key, name in weight_map.items()})
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        where = {}
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                where.update(dict.fromkeys(handle.keys(), file))
        return cls(where)

    def restore(self, model: torch.nn.Module, module_names: Iterable[str]) -> int:
        """Copy the file weights of `module_names` (Linear layers, peft-wrapped or not) into `model`."""
        params = dict(model.named_parameters())
        by_file: dict[Path, list[tuple[str, torch.nn.Parameter]]] = defaultdict(list)
        for name in module_names:
            key = f"{name}.weight"
            target = params.get(f"{name}.base_layer.weight", params.get(key))
            if key not in self._where or target is None:
                raise PipelineError(f"{key}: not found in both the model files and the loaded model")
            by_file[self._where[key]].append((key, target))
        with torch.no_grad():
            for file, targets in by_file.items():
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for key, target in targets:
                        # The same cast from_pretrained made when it loaded the model.
                        target.copy_(handle.get_tensor(key).to(dtype=target.dtype))
        return sum(len(t) for t in by_file.values())
