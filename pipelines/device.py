"""Device and dtype choice, device-memory errors, and freeing device memory between models."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from previewd.errors import ConfigError, PipelineOutOfMemory

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """Turn config values into a concrete (device, dtype name).

    auto: CUDA when available, bfloat16 there (as ai-toolkit trains) and float32 on CPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and nvidia_gpu_present():
            logger.warning("an NVIDIA GPU is present but CUDA is unusable here (%s): rendering on the CPU, "
                           "which is very slow; set `device: cuda` to fail instead", cuda_problem())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available ({cuda_problem()})")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r} requested but this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return device, dtype


def nvidia_gpu_present() -> bool:
    """An NVIDIA driver is loaded (whatever torch thinks of it)."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


def cuda_problem() -> str:
    """Why torch has no CUDA, in a few words a user can act on."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: install the CUDA build of torch"
    if not nvidia_gpu_present():
        return "no NVIDIA driver or device node (/dev/nvidia0) is visible"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot initialise the driver"


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
