"""Quantising a loaded model exactly as ai-toolkit quantises the model it samples from.

aitk-quantized.md §2 and §4:
- `qfloat8`: optimum-quanto, every Linear becomes a `QLinear` (float8_e4m3fn weights, one absmax/448
  scale per output row, in the weight dtype). Per layer this is independent of ai-toolkit's
  block-by-block order, so quantising the whole model at once gives the same weights.
- `uint2`..`uint8`: ai-toolkit's own copy of torchao 0.10's weight-only uintx scheme (asymmetric,
  groups of 64 inputs, arithmetic in the weight dtype). Layers whose input width is not a multiple of
  64 stay in full precision, and uint8 quantises nothing (ai-toolkit refuses it, as torchao 0.10 did).
With an accuracy recovery adapter only the layers it names are quantised; the adapter itself is a
runtime branch (runtime_lora).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from previewd.errors import ModelNotFound, PipelineError
from previewd.pipelines.quantization import Quantization
from previewd.pipelines.runtime_lora import BranchSet, Pair

GROUP_SIZE = 64
_UINT = re.compile(r"^uint([2-8])$")


def uint_bits(qtype: str) -> int | None:
    """N for `uintN`, None for any other qtype."""
    match = _UINT.match(qtype)
    return int(match.group(1)) if match else None


def uintx_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero_point) of `weight` [out, in]: torchao 0.10's choose_qparams_affine and
    quantize_affine for MappingType.ASYMMETRIC, preserve_zero, INT zero-point domain, per group of 64
    inputs, computed in the weight dtype (uintx_quant.py:146-178)."""
    out_features, in_features = weight.shape
    top = 2 ** bits - 1
    groups = weight.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    min_neg = torch.clamp(groups.amin(dim=-1, keepdim=True), max=0)
    max_pos = torch.clamp(groups.amax(dim=-1, keepdim=True), min=0)
    scale = torch.clamp((max_pos - min_neg) / float(top), min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(0 - torch.round(min_neg / scale), 0, top).to(torch.int32)
    codes = torch.clamp(torch.round(groups * (1.0 / scale)) + zero_point, 0, top).to(torch.uint8)
    return codes, scale, zero_point


class UIntXLinear(nn.Linear):
    """A Linear whose weight is held as uintN codes and dequantised for every call, as ai-toolkit's
    OstrisLinear does: F.linear(x, ((q - zp) * scale).to(x.dtype), bias). Codes take one byte each."""

    def __init__(self, linear: nn.Linear, bits: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        codes, scale, zero_point = uintx_quantize(linear.weight.detach(), bits)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_parameter("weight", None)
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        """_dequantize_native (uintx_quant.py:180-193): integer difference, cast, then scale."""
        weight = (self.codes.to(torch.int32) - self.zero_point).to(self.scale.dtype) * self.scale
        return weight.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, uint{self.bits}, group_size={GROUP_SIZE}"


def _linears(model: nn.Module, only: Collection[str] | None) -> dict[str, nn.Linear]:
    # Already quantised layers (quanto's carry `weight_qtype`) are skipped, as quanto skips them.
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not isinstance(module, UIntXLinear)
             and not hasattr(module, "weight_qtype") and (only is None or name in only)}
    if only is not None and (missing := sorted(set(only) - set(found))):
        raise PipelineError(f"cannot quantise {len(missing)} layer(s) that are not Linear layers of the model, "
                            f"e.g. {missing[0]!r}")
    return found


def _keep_quanto_0_2_4_kernels() -> None:
    """quanto >= 0.2.5 turns bf16/fp16 qfloat8 weights on a CUDA device into Marlin FP8 tensors, whose
    kernel rounds differently (and is compiled on first use); ai-toolkit pins 0.2.4, whose weights
    dequantise and matmul (`qbytes_mm`, the same on CPU and CUDA). quanto consults the CUDA extension
    only to choose Marlin there, so its weights keep 0.2.4's path when it looks unavailable."""
    from optimum.quanto.tensor.weights import qbytes

    available = qbytes.is_extension_available
    if getattr(available, "previewd", False):
        return

    def without_marlin(name: str) -> bool:
        return name != "quanto_cuda" and available(name)

    without_marlin.previewd = True
    qbytes.is_extension_available = without_marlin


def quantize_linears(model: nn.Module, qtype: str, only: Collection[str] | None = None) -> list[str]:
    """Quantise the Linear layers of `model` (all, or those named in `only`) to `qtype` in place, as
    ai-toolkit does; the names of the layers that ended up quantised, sorted."""
    layers = _linears(model, only)
    if qtype == "qfloat8":
        from optimum.quanto import freeze, qfloat8, quantize

        _keep_quanto_0_2_4_kernels()
        # An empty include list would quantise everything: quanto reads it as "no filter".
        if layers:
            quantize(model, weights=qfloat8, include=None if only is None else sorted(layers))
            freeze(model)
        return sorted(layers)
    bits = uint_bits(qtype)
    if bits is None:
        raise PipelineError(f"quantisation {qtype!r} is not reproduced (qfloat8, uint2..uint8)")
    if bits == 8:
        return []
    done = []
    with torch.no_grad():
        for name, linear in layers.items():
            if linear.in_features % GROUP_SIZE:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, UIntXLinear(linear, bits))
            done.append(name)
    return sorted(done)


def ara_file(ara: str) -> Path:
    """The adapter's file: a local path, else `user/repo/file.safetensors` from the local Hugging Face
    cache, where ai-toolkit downloaded it when it trained on this machine. Never downloads."""
    local = Path(ara).expanduser()
    if local.is_file():
        return local
    parts = ara.split("/")
    if len(parts) != 3:
        raise ModelNotFound(f"accuracy recovery adapter {ara!r}: file not found")
    from huggingface_hub import hf_hub_download

    repo, filename = "/".join(parts[:2]), parts[2]
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception as exc:  # not cached, or not a valid repo id: either way it is not here
        raise ModelNotFound(f"accuracy recovery adapter {ara!r} is not in the local Hugging Face cache and "
                            f"previewd never downloads: fetch it with `hf download {repo} {filename}`") from exc


@dataclass
class QuantizedModel:
    """What quantisation made of a loaded model."""

    quantization: Quantization
    transformer_layers: list[str] = field(default_factory=list)
    text_encoder_layers: list[str] = field(default_factory=list)
    ara: BranchSet | None = None

    def quantize_text_encoder(self, text_encoder: nn.Module) -> None:
        """The whole encoder (vision tower included), as ai-toolkit's `quantize(text_encoder, ...)`."""
        if self.quantization.text_encoder is not None:
            self.text_encoder_layers = quantize_linears(text_encoder, self.quantization.text_encoder)

    def record(self) -> dict:
        return {**self.quantization.describe(), "transformer_layers": len(self.transformer_layers),
                "text_encoder_layers": len(self.text_encoder_layers),
                "ara_layers": 0 if self.ara is None else len(self.ara.modules)}


def quantize_transformer(quantization: Quantization, transformer: nn.Module, *, dtype: torch.dtype,
                         read_ara: Callable[[Path], dict[str, Pair]]) -> QuantizedModel:
    """Quantise as ai-toolkit's load_model does (aitk-quantized.md §2). With an adapter, only the layers
    it names are quantised and it becomes an always-on branch in the run dtype, attached after the
    layers are replaced. `read_ara(file)` gives the adapter's (down, up) per Linear layer."""
    done = QuantizedModel(quantization)
    if quantization.transformer is None:
        return done
    if quantization.ara is None:
        done.transformer_layers = quantize_linears(transformer, quantization.transformer)
        return done
    pairs = read_ara(ara_file(quantization.ara))
    done.transformer_layers = quantize_linears(transformer, quantization.transformer, only=set(pairs))
    done.ara = BranchSet(transformer, "ara", dtype)
    done.ara.load(pairs)
    return done
