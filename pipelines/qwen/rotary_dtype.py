"""The Qwen text encoder's rotary tables in the model dtype, as ai-toolkit has them.

ai-toolkit moves the loaded encoder with `.to(device, dtype)` (qwen_image.py load_model), which casts
the rotary `inv_freq` buffers that from_pretrained keeps in float32; the reference server does not.
In bfloat16 this changes every prompt embedding (the vision tower even computes its rotary angles in
the buffer's dtype): 13/255 on the bf16 golden q06 without it. So the aitk profile encodes with the
tables cast, and the buffers keep their float32 values otherwise. The tensors stay the same objects
(only `.data` changes), so offload hooks that hold them are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def rotary_tables_in(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """`module`'s rotary `inv_freq` buffers cast to `dtype` for the duration."""
    kept = []
    for name, buffer in module.named_buffers():
        if name.rpartition(".")[2].endswith("inv_freq") and buffer.dtype != dtype:
            kept.append((buffer, buffer.data))
            buffer.data = buffer.data.to(dtype)
    try:
        yield
    finally:
        for buffer, data in kept:
            buffer.data = data.to(buffer.device)
