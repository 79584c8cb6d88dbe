"""Device and dtype choice, device-memory errors, and freeing device memory between models."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from previewd.errors import ConfigError, PipelineOutOfMemory

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


@contextmanager
def raise_oom_as(model_id: str, device: str) -> Iterator[None]:
    """Turn torch running out of device memory into PipelineOutOfMemory, which the caller retries.

    Only the message of torch's error survives: its traceback holds the frames, and through them the
    activations, of the failed call, which must not outlive it while the caller frees memory.
    """
    try:
        yield
    except torch.OutOfMemoryError as exc:
        # `from None` hides it, but Python still links it as __context__: drop its frames as well.
        exc.__traceback__ = None
        raise PipelineOutOfMemory(f"{model_id}: out of memory on {device}: {exc}") from None
