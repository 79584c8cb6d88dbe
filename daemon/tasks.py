"""What one queued job carries: the render (a RenderSpec) and where its image goes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from previewd.spec import RenderSpec, canonical_hash


class OutputTarget(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    out_dir: str
    """Folder that holds the images, manifest.json, grid.png and index.html."""
    image_name: str
    """File name of this render inside out_dir."""
    title: str
    """Training-run or request name, for the manifest and page."""
    source: str
    """The file the job came from (the run's config.yaml, or the request)."""
    checkpoint: str | None = None
    """Original file name of the LoRA checkpoint (None: base model)."""
    step: int | None = None
    prompt_index: int
    format: Literal["png", "jpg"] = "png"
    job_dir: str | None = None
    """For training runs: the run folder, where ai-toolkit's own samples/ live."""
    parity_gaps: tuple[str, ...] = ()
    """Known reasons the run's own samples may differ from this render (not part of the job's identity)."""
    strength: float | None = None
    """The LoRA multiplier when the request sweeps several (a grid axis); None: not swept."""
    seed: int | None = None
    """The seed when the request sweeps several (a grid axis); None: not swept."""


class RenderTask(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: RenderSpec
    target: OutputTarget

    def lora_source(self) -> Path:
        """Where a person fixes the LoRA of this render: a run's checkpoint, else the request."""
        target = self.target
        if target.job_dir and target.checkpoint and (Path(target.job_dir) / target.checkpoint).is_file():
            return Path(target.job_dir) / target.checkpoint
        return Path(target.source)

    def idempotency_key(self) -> str:
        """Same checkpoint content + same render parameters + same destination = same job."""
        return canonical_hash({"spec": self.spec.identity(), "out_dir": self.target.out_dir,
                               "image": self.target.image_name})


def image_name(step: int | None, checkpoint: str | None, prompt_index: int, fmt: str, *,
               by_name: bool = False, strength: float | None = None, seed: int | None = None) -> str:
    """`<step:09d>_<i>` like ai-toolkit's sample names; `base_<i>` without a LoRA; the checkpoint's
    stem when its step is unknown or `by_name` (several LoRAs of one request share a step). Swept
    axes add `_m<strength>` and `_s<seed>`, so every cell of a sweep has a name of its own."""
    if checkpoint is None:
        label = "base"
    elif step is not None and not by_name:
        label = f"{step:09d}"
    else:
        label = checkpoint.rsplit(".", 1)[0]
    sweep = (f"_m{strength:g}" if strength is not None else "") + (f"_s{seed}" if seed is not None else "")
    return f"{label}_{prompt_index:02d}{sweep}.{fmt}"
