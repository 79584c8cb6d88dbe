"""Tiny random-weight pipelines for every model id, so the product runs on a CPU with no download.

Each folder is a real diffusers-layout pipeline (offline tokenizers included) and loads through
the same code path as real weights: point `models.<id>.path` at it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from previewd.pipelines import tiny_flux2, tiny_qwen
from previewd.catalog import MODELS

_BUILDERS = {model_id: (tiny_flux2.build if model_id == "flux2" else tiny_qwen.build) for model_id in MODELS}


def build_all(out_dir: Path, model_ids: list[str] | None = None) -> dict[str, Path]:
    """Write `<out_dir>/<model id>/` for each id; returns the folders."""
    folders = {}
    for model_id in model_ids or list(MODELS):
        folder = out_dir / model_id
        _BUILDERS[model_id](model_id, folder)
        folders[model_id] = folder
    return folders


def write_random_lora(model_dir: Path, path: Path, *, seed: int, step: int | None = None, rank: int = 4,
                      scale: float = 0.8) -> Path:
    """A LoRA over every Linear in the Qwen transformer blocks, in ai-toolkit's saved format.

    Keys are `diffusion_model.<module>.lora_A/lora_B.weight` with no alpha, bf16, and a
    `training_info` header like ai-toolkit writes. lora_B is non-zero (ai-toolkit initialises
    it to zero, which would render the base image) so each checkpoint visibly changes pixels.
    """
    weights = model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    generator = torch.Generator("cpu").manual_seed(seed)
    tensors = {}
    with safe_open(str(weights), framework="pt") as handle:
        for key in sorted(handle.keys()):
            if not key.startswith("transformer_blocks.") or not key.endswith(".weight"):
                continue
            shape = handle.get_slice(key).get_shape()
            if len(shape) != 2:
                continue
            module = key[: -len(".weight")]
            out_features, in_features = shape
            tensors[f"diffusion_model.{module}.lora_A.weight"] = (
                torch.randn(rank, in_features, generator=generator) / in_features**0.5).to(torch.bfloat16)
            tensors[f"diffusion_model.{module}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * scale / rank**0.5).to(torch.bfloat16)
    metadata = {"format": "pt", "software": json.dumps({"name": "previewd tiny-models"})}
    if step is not None:
        metadata["training_info"] = json.dumps({"step": step, "epoch": 0})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
