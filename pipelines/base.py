"""The interface every model adapter implements, and the small pieces their renders share.

Adapters know nothing of queues or outboxes. Torch-free: `previewd.pipelines` imports this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Callable, Protocol

from previewd.catalog import validate_spec
from previewd.errors import LoraError, PipelineError
from previewd.pipelines.quantization import Quantization
from previewd.spec import ModelSource, RenderResult, RenderSpec

StepCallback = Callable[[int, int], None]
"""on_step(step_done, steps_total): progress, and the place to ping the service watchdog."""
StopCheck = Callable[[], bool]
"""should_stop(): True asks the render to stop after the current step (RenderInterrupted)."""


class PreviewPipeline(Protocol):
    model_id: str

    def __init__(self, model_id: str, source: ModelSource, *, device: str, dtype: str,
                 quantization: Quantization | None = None) -> None:
        """Remember where weights are; load nothing yet. `device`/`dtype` are already resolved;
        `quantization` is what `load` quantises (None: what `source` says) and the only one `render`
        accepts."""

    def load(self) -> None:
        """Load the base model onto the device (idempotent)."""

    def render(self, spec: RenderSpec, *, on_step: StepCallback | None = None,
               should_stop: StopCheck | None = None) -> RenderResult:
        """Render one image. Applies/swaps `spec.lora` in place (no base-model reload)."""

    def unload(self) -> None:
        """Release the model and its device memory."""


def check_spec(spec: RenderSpec, model_id: str, problems: Iterable[str] = ()) -> None:
    """Refuse what the adapter for `model_id` cannot render, before anything loads.

    Raises PipelineError naming the catalogue's problems with `spec`, a model mismatch and the
    adapter's own `problems`; LoraError when its LoRA file is not there.
    """
    found = validate_spec(spec)
    if spec.model != model_id:
        found.append(f"model: this adapter renders {model_id}, not {spec.model}")
    found += problems
    if found:
        raise PipelineError(f"cannot render {spec.model}: " + "; ".join(found))
    if spec.lora is not None and not os.path.isfile(spec.lora.path):
        raise LoraError(f"{spec.lora.path}: LoRA file not found")


class Stopwatch:
    """Seconds per stage of one render, for `RenderResult.timings`."""

    def __init__(self) -> None:
        self._started = self._last = time.perf_counter()
        self._laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        """Record the time since the previous lap (or the start) as `stage`."""
        now = time.perf_counter()
        self._laps[stage] = now - self._last
        self._last = now

    def timings(self) -> dict[str, float]:
        return {**self._laps, "total": time.perf_counter() - self._started}
