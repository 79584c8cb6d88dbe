"""Device and dtype choice, and freeing device memory between models."""

from __future__ import annotations

import gc

import torch

from previewd.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """Turn config values into a concrete (device, dtype name).

    auto: CUDA when available, bfloat16 there (as ai-toolkit trains) and float32 on CPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return device, dtype


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_bytes(device: str) -> int | None:
    """Free memory on a CUDA device, None where that is not measurable (CPU)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)
