"""Tiny random-weight pipelines for every model id, so the product runs on a CPU with no download.

Each folder is a real diffusers-layout pipeline (offline tokenizers included) and loads through
the same code path as real weights: point `models.<id>.path` at it. The builders are per family:
`qwen.build` and `flux2.build`, each with a LoRA writer in ai-toolkit's file format.
"""

from __future__ import annotations

from pathlib import Path

from previewd.catalog import MODELS
from previewd.fileio import mode_as_opened
from previewd.pipelines.tiny import flux2, qwen

_BUILDERS = {"qwen": qwen.build, "flux2": flux2.build}


def build_all(out_dir: Path, model_ids: list[str] | None = None) -> dict[str, Path]:
    """Write `<out_dir>/<model id>/` for each id; returns the folders."""
    folders = {}
    for model_id in model_ids or list(MODELS):
        folder = out_dir / model_id
        _BUILDERS[MODELS[model_id].family](model_id, folder)
        for weights in folder.rglob("*.safetensors"):
            mode_as_opened(weights)
        folders[model_id] = folder
    return folders
