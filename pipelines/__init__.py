"""Model adapters. Importing this package imports no torch: adapters load lazily by model id."""

from __future__ import annotations

import importlib
import sys

from previewd.catalog import MODELS
from previewd.errors import ConfigError
from previewd.pipelines import _torchvision_compat
from previewd.pipelines.base import PreviewPipeline
from previewd.pipelines.quantization import Quantization
from previewd.spec import ModelSource

_torchvision_compat.install()

__all__ = ["PreviewPipeline", "create"]

_ADAPTERS = {
    "qwen_image": ("qwen.adapter", "QwenImagePreview"),
    "qwen_image_2512": ("qwen.adapter", "QwenImagePreview"),
    "qwen_image_edit": ("qwen.adapter", "QwenImageEditPreview"),
    "qwen_image_edit_plus": ("qwen.adapter", "QwenImageEditPlusPreview"),
    "qwen_image_edit_plus_2511": ("qwen.adapter", "QwenImageEditPlusPreview"),
    "flux2": ("flux2.adapter", "Flux2Preview"),
}
"""Model id -> (module under previewd.pipelines, adapter class)."""
assert set(_ADAPTERS) == set(MODELS)


def adapter_class(model_id: str) -> type:
    if model_id not in _ADAPTERS:
        raise ConfigError(f"unknown model id {model_id!r} (known: {', '.join(MODELS)})")
    module, cls = _ADAPTERS[model_id]
    return getattr(importlib.import_module(f"previewd.pipelines.{module}"), cls)


def create(model_id: str, source: ModelSource, *, device: str = "auto", dtype: str = "auto",
           quantization: Quantization | None = None) -> PreviewPipeline:
    """Build the adapter for `model_id` (weights are loaded by its `load()`), quantised as
    `quantization` says (None: as the configured source says)."""
    cls = adapter_class(model_id)
    from previewd.pipelines import device as devices

    _route_library_output()
    resolved_device, resolved_dtype = devices.resolve(device, dtype)
    return cls(model_id, source, device=resolved_device, dtype=resolved_dtype, quantization=quantization)


def _route_library_output() -> None:
    """diffusers and transformers log through stderr handlers of their own and draw tqdm bars:
    send their records through previewd's handlers (one format, journald priorities) and keep the
    bars off anything that is not a terminal, where they are escape-code noise."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        if not sys.stderr.isatty():
            library.disable_progress_bar()
    if not sys.stderr.isatty():
        huggingface_hub.utils.disable_progress_bars()
