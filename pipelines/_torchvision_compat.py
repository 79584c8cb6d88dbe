"""Let a CUDA-built torchvision import on a CPU-only torch.

PyPI's torchvision wheel links its C ops against CUDA libraries. On CPU torch its `_C` does not
load, and `torchvision/_meta_registrations.py` then fails on the missing `torchvision::nms`
schema, which breaks transformers' processors (and through them peft and diffusers' Qwen and
FLUX.2 pipelines). We only need torchvision's pure-torch transforms, so when `_C` cannot load we
declare the two schemas it registers fakes for. With a working `_C` this does nothing.
See ../shared/reference/tiny-models-cpu.md §2.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library fragment alive


def _prepare(origin: str | None) -> None:
    global _library
    import torch

    if _library is not None or origin is None:
        return
    libs = sorted(Path(origin).parent.glob("_C*.so")) + sorted(Path(origin).parent.glob("_C*.pyd"))
    try:
        if not libs:
            raise OSError("no torchvision _C library")
        torch.ops.load_library(str(libs[0]))
        return
    except (OSError, RuntimeError):
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None:
            _prepare(spec.origin)
        return spec


def install() -> None:
    """Arm the hook (cheap: torch is imported only when torchvision is)."""
    if "torchvision" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
