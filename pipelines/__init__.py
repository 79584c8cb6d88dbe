"""Model adapters. Importing this package imports no torch: adapters load lazily by model id."""

from __future__ import annotations

import importlib

from previewd.errors import ConfigError
from previewd.pipelines import _torchvision_compat
from previewd.pipelines.base import PreviewPipeline
from previewd.pipelines.models import MODELS, ModelInfo, validate_spec
from previewd.spec import ModelSource

_torchvision_compat.install()

__all__ = ["MODELS", "ModelInfo", "PreviewPipeline", "create", "validate_spec"]


def create(model_id: str, source: ModelSource, *, device: str = "auto",
           dtype: str = "auto") -> PreviewPipeline:
    """Build the adapter for `model_id` (weights are loaded by its `load()`)."""
    info = MODELS.get(model_id)
    if info is None:
        raise ConfigError(f"unknown model id {model_id!r} (known: {', '.join(MODELS)})")
    from previewd.pipelines import device as devices

    resolved_device, resolved_dtype = devices.resolve(device, dtype)
    module = importlib.import_module(f"previewd.pipelines.{info.module}")
    return getattr(module, info.cls)(model_id, source, device=resolved_device, dtype=resolved_dtype)
