"""The comparison manifest (`manifest.json`) of one output folder: one definition that the worker
writes, the outbox reads and rewrites, and `previewd status` and the page read back."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

MANIFEST_VERSION = 1
# The models keep pydantic's default of ignoring unknown keys: a manifest that a newer previewd
# wrote may carry more, and is still read.


class ControlRef(BaseModel):
    """A control image of the render, named by content (its file lives in the state folder)."""

    slot: str
    sha256: str | None = None


class RenderEntry(BaseModel):
    """One rendered image and how it was made."""

    image: str = ""
    """File name inside the output folder (set by the outbox)."""
    rendered_at: str | None = None
    job_id: int | None = None
    model: str
    base: str | None = None
    """The run's own base weights when it was rendered on them (None: the configured model)."""
    checkpoint: str | None = None
    """Original file name of the LoRA checkpoint; None: the base model."""
    checkpoint_sha256: str | None = None
    step: int | None = None
    prompt_index: int
    prompt: str
    neg: str = ""
    seed: int
    requested_seed: int | None = None
    width: int
    height: int
    requested_width: int | None = None
    requested_height: int | None = None
    sample_steps: int
    guidance_scale: float
    network_multiplier: float | None = None
    parity: str
    control_images: list[ControlRef] = Field(default_factory=list)
    record: dict[str, Any] = Field(default_factory=dict)
    """Every setting that changed pixels, as the pipeline reports it."""
    timings: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    source: str | None = None
    """The file the job came from (a run's config.yaml or a request)."""
    aitk_sample: str | None = None
    """ai-toolkit's own sample of the same step and prompt, relative to the output folder."""
    aitk_sample_diff: dict[str, Any] | None = None

    @property
    def row_key(self) -> str:
        return self.checkpoint or "base"


class PromptSummary(BaseModel):
    index: int
    prompt: str
    neg: str = ""


class CheckpointSummary(BaseModel):
    checkpoint: str | None
    step: int | None = None
    sha256: str | None = None

    @property
    def label(self) -> str:
        if self.checkpoint is None:
            return "base model"
        return f"step {self.step}" if self.step is not None else self.checkpoint


class Manifest(BaseModel):
    version: int = MANIFEST_VERSION
    title: str | None = None
    source: str | None = None
    job_dir: str | None = None
    model: str | None = None
    updated_at: str | None = None
    parity_gaps: list[str] = Field(default_factory=list)
    renders: list[RenderEntry] = Field(default_factory=list)
    prompts: list[PromptSummary] = Field(default_factory=list)
    """Derived from `renders` on every write (one source of truth)."""
    checkpoints: list[CheckpointSummary] = Field(default_factory=list)

    def summarise(self) -> None:
        """Sort the renders and derive the prompt and checkpoint lists from them."""
        self.renders.sort(key=lambda r: (_step_key(r.checkpoint, r.step), r.prompt_index, r.image))
        prompts: dict[int, PromptSummary] = {}
        checkpoints: dict[str, CheckpointSummary] = {}
        for r in self.renders:
            prompts.setdefault(r.prompt_index, PromptSummary(index=r.prompt_index, prompt=r.prompt, neg=r.neg))
            checkpoints.setdefault(r.row_key, CheckpointSummary(checkpoint=r.checkpoint, step=r.step,
                                                                sha256=r.checkpoint_sha256))
        self.prompts = [prompts[i] for i in sorted(prompts)]
        self.checkpoints = sorted(checkpoints.values(), key=lambda c: _step_key(c.checkpoint, c.step))


def _step_key(checkpoint: str | None, step: int | None) -> tuple:
    # The base model first, then by step, then checkpoints without a known step by name.
    if checkpoint is None:
        return (0, 0, "")
    return (1, step, "") if step is not None else (2, 0, checkpoint)
