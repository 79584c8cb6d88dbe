"""A model's original weights, read back from its safetensors files to undo in-place LoRA merges.

Unfusing a LoRA subtracts its delta again, which in bfloat16 leaves a rounding residue that grows
with every checkpoint switch (the tiny 2512 model drifted by 0.02 after ten switches: 9 pixel
levels). Reading just the touched tensors back from the memory-mapped files restores the base
bit for bit, without holding a second copy of the weights in RAM. On a GPU the tensors go up through
two reused pinned host buffers, so reading the next tensor overlaps the previous one's copy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from previewd.errors import PipelineError


class _PinnedStaging:
    """Two page-locked host buffers used in turn for host-to-device copies that do not block the host."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def upload(self, tensor: torch.Tensor, target: torch.Tensor) -> None:
        turn, self._turn = self._turn, self._turn ^ 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # its previous copy has left the buffer
        size = tensor.numel() * tensor.element_size()
        if self._buffers[turn] is None or self._buffers[turn].numel() < size:
            self._buffers[turn] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        staged = self._buffers[turn][:size].view(tensor.dtype).view(tensor.shape)
        staged.copy_(tensor)
        stream = torch.cuda.current_stream(target.device)
        with torch.cuda.stream(stream):
            target.copy_(staged, non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record(stream)

    def wait(self) -> None:
        for event in self._copied:
            if event is not None:
                event.synchronize()


class BaseWeights:
    def __init__(self, where: dict[str, Path]):
        self._where = where
        self._staging = _PinnedStaging()

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
                        tensor = handle.get_tensor(key).to(dtype=target.dtype)
                        if target.device.type == "cuda":
                            self._staging.upload(tensor, target)
                        else:
                            target.copy_(tensor)
            self._staging.wait()
        return sum(len(t) for t in by_file.values())
