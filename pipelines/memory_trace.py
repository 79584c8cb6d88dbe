"""Peak activation memory of a component's forward pass, computed on the meta device.

The component is built from its config on the meta device (no weights, no compute) and run on
meta inputs of a render's shapes while a dispatch mode keeps the sum of the bytes of every tensor
storage alive: its maximum is the working set the forward needs beyond the weights. This is a
computed figure, not a measurement: it counts what the Python-visible graph holds, not allocator
fragmentation, kernel workspaces or the CUDA context (memory.reserve_gb covers those).

Two rules make the trace follow what runs on a GPU:
- attention is counted as CUDA's fused SDPA kernels (flash / memory-efficient) run it: the output
  only, never the sequence x sequence score matrix the meta device's math fallback would build;
- a data-dependent read (`.item()`, e.g. transformers' "can the causal mask be skipped" checks)
  answers 0, so the trace takes the plain path; a padding mask would add sequence^2 bytes of bool
  (256 KiB for FLUX.2's 512 tokens).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from previewd.catalog import MODELS

QWEN_PROMPT_TOKENS = 1024 + 34
"""Qwen pipelines truncate prompts to 1024 tokens after their 34-token chat template."""
QWEN_EDIT_PLUS_TE_SIDE = 384
"""Edit-plus shows each control image to the text encoder at about 384x384 (CONDITION_IMAGE_SIZE)."""
QWEN_CONTROL_SIDE = 1024
"""Control images reach the VAE (and Qwen-Image-Edit's text encoder) at about 1 MP."""
QWEN_VISION_PATCH, QWEN_VISION_MERGE = 14, 2
"""Qwen2.5-VL's vision tower: 14 px patches, 2x2 patches merged into one LM token."""
FLUX2_PROMPT_TOKENS = 512
"""FLUX.2 pads every prompt to 512 tokens."""


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 0
        # Storages an op reads but did not create here (weights, inputs) cost nothing new.
        for tensor in tree_flatten((args, kwargs))[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self._seen:
                self._seen[tensor.untyped_storage()] = 0
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    size = storage.nbytes()
                    self._seen[storage] = size
                    self.live += size
                    weakref.finalize(storage, self._free, size)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def _fused_sdpa(query, key, value, *args, **kwargs):
    """What CUDA's fused attention allocates: the output, no score matrix."""
    return torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)


@contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def peak_bytes(run: Callable[[], object]) -> int:
    """Peak bytes of tensors `run()` keeps alive at once (its inputs and weights excluded)."""
    with torch.no_grad(), _fused_attention(), LiveBytes() as tracker:
        run()
    return tracker.peak


@dataclass(frozen=True)
class Workload:
    """The largest thing one render of a model asks: its size and its control images."""

    width: int = 1024
    height: int = 1024
    controls: int = 0


def default_workload(model_id: str, width: int = 1024, height: int = 1024) -> Workload:
    """The most control images a render of `model_id` can carry: 1 (edit), 3 (edit-plus), else 0."""
    return Workload(width, height, {"none": 0, "single": 1, "multi": 3}[MODELS[model_id].control])


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _vision_patches(model_id: str) -> tuple[int, int]:
    """(patches, LM tokens) of one control image through the Qwen2.5-VL vision tower."""
    side = QWEN_EDIT_PLUS_TE_SIDE if MODELS[model_id].control == "multi" else QWEN_CONTROL_SIDE
    grid = max(1, round(side / (QWEN_VISION_PATCH * QWEN_VISION_MERGE))) * QWEN_VISION_MERGE
    return grid * grid, grid * grid // QWEN_VISION_MERGE ** 2


def _qwen_text_encoder(model, model_id: str, load: Workload, dtype: torch.dtype) -> int:
    vision = model.config.vision_config
    patches, image_tokens = _vision_patches(model_id)
    tokens = QWEN_PROMPT_TOKENS + load.controls * image_tokens
    ids = _meta(1, tokens, dtype=torch.int64)
    text = peak_bytes(lambda: model(input_ids=ids, attention_mask=None, output_hidden_states=True, use_cache=False))
    if not load.controls:
        return text
    visual = model.model.visual
    pixels = _meta(patches, vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2, dtype=dtype)
    head = vision.hidden_size // vision.num_heads
    # Every block as one full-attention window: with fused attention that costs what windows do.
    cu_seqlens = torch.tensor([0, patches], dtype=torch.int32)

    def see() -> None:
        hidden = visual.patch_embed(pixels)
        cos_sin = (_meta(patches, head, dtype=dtype), _meta(patches, head, dtype=dtype))
        for block in visual.blocks:
            hidden = block(hidden, cu_seqlens=cu_seqlens, position_embeddings=cos_sin)
        return visual.merger(hidden)

    # Images are encoded with the prompt, so their features are alive during the LM pass.
    features = load.controls * image_tokens * vision.out_hidden_size * torch.finfo(dtype).bits // 8
    return max(text + features, peak_bytes(see))


def _qwen_transformer(model, model_id: str, load: Workload, dtype: torch.dtype) -> int:
    config = model.config
    rows, cols = load.height // 16, load.width // 16
    control = QWEN_CONTROL_SIDE // 16
    shapes = [(1, rows, cols)] + [(1, control, control)] * load.controls
    image_tokens = sum(h * w for _t, h, w in shapes)
    # The template is dropped from the embeddings; the images' tokens stay in them.
    text_tokens = QWEN_PROMPT_TOKENS - 34 + load.controls * _vision_patches(model_id)[1]
    latents = _meta(1, image_tokens, config.in_channels, dtype=dtype)
    text = _meta(1, text_tokens, config.joint_attention_dim, dtype=dtype)
    return peak_bytes(lambda: model(hidden_states=latents, encoder_hidden_states=text,
                                    encoder_hidden_states_mask=None, timestep=_meta(1, dtype=dtype),
                                    img_shapes=[shapes], return_dict=False))


def _qwen_vae(model, model_id: str, load: Workload, dtype: torch.dtype) -> int:
    z = model.config.z_dim
    decode = peak_bytes(lambda: model.decode(_meta(1, z, 1, load.height // 8, load.width // 8, dtype=dtype)))
    if not load.controls:
        return decode
    pixels = _meta(1, 3, 1, QWEN_CONTROL_SIDE, QWEN_CONTROL_SIDE, dtype=dtype)
    return max(decode, peak_bytes(lambda: model.encode(pixels)))


def _flux2_text_encoder(model, model_id: str, load: Workload, dtype: torch.dtype) -> int:
    ids = _meta(1, FLUX2_PROMPT_TOKENS, dtype=torch.int64)
    return peak_bytes(lambda: model(input_ids=ids, attention_mask=None, output_hidden_states=True, use_cache=False))


def _flux2_transformer(model, model_id: str, load: Workload, dtype: torch.dtype) -> int:
    config = model.config
    tokens = (load.height // 16) * (load.width // 16) * (1 + load.controls)
    latents = _meta(1, tokens, config.in_channels, dtype=dtype)
    text = _meta(1, FLUX2_PROMPT_TOKENS, config.joint_attention_dim, dtype=dtype)
    step = _meta(1, dtype=dtype)
    return peak_bytes(lambda: model(hidden_states=latents, encoder_hidden_states=text, timestep=step, guidance=step,
                                    img_ids=_meta(tokens, 4, dtype=torch.int64),
                                    txt_ids=_meta(FLUX2_PROMPT_TOKENS, 4, dtype=torch.int64), return_dict=False))


def _flux2_vae(model, model_id: str, load: Workload, dtype: torch.dtype) -> int:
    channels = model.config.latent_channels
    decode = peak_bytes(lambda: model.decode(_meta(1, channels, load.height // 8, load.width // 8, dtype=dtype)))
    if not load.controls:
        return decode
    pixels = _meta(1, 3, QWEN_CONTROL_SIDE, QWEN_CONTROL_SIDE, dtype=dtype)
    return max(decode, peak_bytes(lambda: model.encode(pixels)))


_TRACES = {
    ("qwen", "text_encoder"): _qwen_text_encoder, ("qwen", "transformer"): _qwen_transformer,
    ("qwen", "vae"): _qwen_vae, ("flux2", "text_encoder"): _flux2_text_encoder,
    ("flux2", "transformer"): _flux2_transformer, ("flux2", "vae"): _flux2_vae,
}


def activation_bytes(model, model_id: str, component: str, load: Workload, dtype: torch.dtype) -> int:
    """Peak activation bytes of `component` (a meta-device module of `model_id`, built in `dtype`) for `load`."""
    return _TRACES[MODELS[model_id].family, component](model, model_id, load, dtype)

