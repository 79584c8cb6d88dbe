"""The comparison manifest (`manifest.json`) of one output folder: one definition that the worker
writes, the outbox reads and rewrites, and `previewd status`, `previewd serve` and the page read back.

Version 2 adds each render's grid axes, the cells that are still queued or failed for good, the
grid layout, and paths relative to the manifest's folder. `manifest.schema.json` beside this file
is its JSON Schema (`Manifest.model_json_schema()`, checked by a test).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

MANIFEST_VERSION = 2
# The models keep pydantic's default of ignoring unknown keys: a manifest that a newer previewd
# wrote may carry more, and is still read.

AxisName = Literal["checkpoint", "prompt", "strength", "seed"]
BASE_ROW = "base"
"""Row key of renders on the base model (no LoRA)."""


class ControlRef(BaseModel):
    """A control image of the render, named by content (its file lives in the state folder)."""

    slot: str
    sha256: str | None = None


class Axes(BaseModel):
    """Where a cell sits in its folder's grid: its value on each axis it was planned on."""

    checkpoint: str = BASE_ROW
    """The checkpoint's file name, or "base" for the base model."""
    prompt: int
    strength: float | None = None
    """The LoRA multiplier, when its request swept several; None: not an axis of this cell."""
    seed: int | None = None
    """The seed, when its request swept several; None: not an axis of this cell."""

    def value(self, axis: str) -> str | int | float | None:
        return getattr(self, axis)


class _Cell(BaseModel):
    """What every cell of the grid says about itself, rendered or not."""

    image: str = ""
    """File name inside the output folder (set by the outbox)."""
    checkpoint: str | None = None
    """Original file name of the LoRA checkpoint; None: the base model."""
    step: int | None = None
    prompt_index: int
    prompt: str
    neg: str = ""
    network_multiplier: float | None = None
    axes: Axes | None = None
    """Always set once read (manifests of version 1 get the checkpoint and prompt axes)."""

    @model_validator(mode="after")
    def _default_axes(self) -> "_Cell":
        if self.axes is None:
            self.axes = Axes(checkpoint=self.checkpoint or BASE_ROW, prompt=self.prompt_index)
        return self

    @property
    def row_key(self) -> str:
        return self.checkpoint or BASE_ROW


class RenderEntry(_Cell):
    """One rendered image and how it was made."""

    rendered_at: str | None = None
    job_id: int | None = None
    model: str
    base: str | None = None
    """The run's own base weights when it was rendered on them (None: the configured model); a
    local folder is given relative to the manifest's folder."""
    checkpoint_sha256: str | None = None
    seed: int
    requested_seed: int | None = None
    width: int
    height: int
    requested_width: int | None = None
    requested_height: int | None = None
    sample_steps: int
    guidance_scale: float
    parity: str
    control_images: list[ControlRef] = Field(default_factory=list)
    record: dict[str, Any] = Field(default_factory=dict)
    """Every setting that changed pixels, as the pipeline reports it (file paths relative to the
    manifest's folder)."""
    timings: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    source: str | None = None
    """The file the job came from (a run's config.yaml or a request), relative to the manifest's folder."""
    aitk_sample: str | None = None
    """ai-toolkit's own sample of the same step and prompt, relative to the manifest's folder."""
    aitk_sample_diff: dict[str, Any] | None = None


class PlannedCell(_Cell):
    """A cell without an image yet: queued, or failed for good (`error` says why)."""

    seed: int
    width: int
    height: int
    job_id: int | None = None
    error: str | None = None
    at: str | None = None
    """When it was queued or failed (UTC, ISO 8601)."""


class PromptSummary(BaseModel):
    index: int
    prompt: str
    neg: str = ""


class CheckpointSummary(BaseModel):
    checkpoint: str | None
    step: int | None = None
    sha256: str | None = None

    @property
    def key(self) -> str:
        return self.checkpoint or BASE_ROW

    @property
    def label(self) -> str:
        if self.checkpoint is None:
            return "base model"
        return f"step {self.step}" if self.step is not None else self.checkpoint


class Layout(BaseModel):
    """How the grid is laid out: the axis of its rows and the axes of its columns (outermost first),
    chosen from what varies in the folder."""

    rows: Literal["checkpoint", "strength", "seed"] = "checkpoint"
    columns: list[Literal["prompt", "strength", "seed"]] = Field(default_factory=lambda: ["prompt"])


class Manifest(BaseModel):
    version: int = MANIFEST_VERSION
    title: str | None = None
    source: str | None = None
    """The run's config.yaml or the request, relative to the manifest's folder."""
    job_dir: str | None = None
    """For training runs: the run folder (where ai-toolkit's samples/ live), relative to the manifest's folder."""
    model: str | None = None
    updated_at: str | None = None
    parity_gaps: list[str] = Field(default_factory=list)
    renders: list[RenderEntry] = Field(default_factory=list)
    pending: list[PlannedCell] = Field(default_factory=list)
    """Queued cells without an image yet."""
    failed: list[PlannedCell] = Field(default_factory=list)
    """Cells whose job failed for good, with the reason."""
    prompts: list[PromptSummary] = Field(default_factory=list)
    """Derived from the cells on every write (one source of truth), as are the lists below."""
    checkpoints: list[CheckpointSummary] = Field(default_factory=list)
    strengths: list[float | None] = Field(default_factory=list)
    """The strengths swept across the folder's cells (empty: strength is not an axis)."""
    seeds: list[int | None] = Field(default_factory=list)
    """The seeds swept across the folder's cells (empty: seed is not an axis)."""
    layout: Layout = Field(default_factory=Layout)

    def cells(self) -> list[_Cell]:
        return [*self.renders, *self.pending, *self.failed]

    def summarise(self) -> None:
        """Sort the cells and derive the prompt, checkpoint, strength and seed lists and the layout."""
        def order(c: _Cell) -> tuple:
            return (_step_key(c.checkpoint, c.step), c.prompt_index, _none_first(c.axes.strength),
                    _none_first(c.axes.seed), c.image)

        for cells in (self.renders, self.pending, self.failed):
            cells.sort(key=order)
        prompts: dict[int, PromptSummary] = {}
        checkpoints: dict[str, CheckpointSummary] = {}
        strengths, seeds = set(), set()
        for c in self.cells():
            prompts.setdefault(c.prompt_index, PromptSummary(index=c.prompt_index, prompt=c.prompt, neg=c.neg))
            checkpoints.setdefault(c.axes.checkpoint, CheckpointSummary(
                checkpoint=c.checkpoint, step=c.step, sha256=getattr(c, "checkpoint_sha256", None)))
            strengths.add(c.axes.strength)
            seeds.add(c.axes.seed)
        self.prompts = [prompts[i] for i in sorted(prompts)]
        self.checkpoints = sorted(checkpoints.values(), key=lambda c: _step_key(c.checkpoint, c.step))
        self.strengths = sorted(strengths, key=_none_first) if strengths != {None} else []
        self.seeds = sorted(seeds, key=_none_first) if seeds != {None} else []
        swept = {"checkpoint": len(self.checkpoints) > 1, "prompt": len(self.prompts) > 1,
                 "strength": bool(self.strengths), "seed": bool(self.seeds)}
        rows = next((a for a in ("checkpoint", "strength", "seed") if swept[a]), "checkpoint")
        columns = [a for a in ("prompt", "strength", "seed") if a != rows and swept[a]]
        self.layout = Layout(rows=rows, columns=columns or ["prompt"])


def _step_key(checkpoint: str | None, step: int | None) -> tuple:
    # The base model first, then by step, then checkpoints without a known step by name.
    if checkpoint is None:
        return (0, 0, "")
    return (1, step, checkpoint) if step is not None else (2, 0, checkpoint)


def _none_first(value: float | None) -> tuple:
    return (0, 0.0) if value is None else (1, value)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of manifest.json (shipped as manifest.schema.json beside this module)."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"previewd manifest.json, version {MANIFEST_VERSION}"
    return schema


if __name__ == "__main__":  # python -m previewd.manifest > daemon/manifest.schema.json
    import json
    import sys

    json.dump(json_schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
