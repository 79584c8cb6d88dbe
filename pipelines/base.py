"""The interface every model adapter implements. Adapters know nothing of queues or outboxes."""

from __future__ import annotations

from typing import Callable, Protocol

from previewd.spec import ModelSource, RenderResult, RenderSpec

StepCallback = Callable[[int, int], None]
"""on_step(step_done, steps_total): progress, and the place to ping the service watchdog."""
StopCheck = Callable[[], bool]
"""should_stop(): True asks the render to stop after the current step (RenderInterrupted)."""


class PreviewPipeline(Protocol):
    model_id: str

    def __init__(self, model_id: str, source: ModelSource, *, device: str, dtype: str) -> None:
        """Remember where weights are; load nothing yet. `device`/`dtype` are already resolved."""

    def load(self) -> None:
        """Load the base model onto the device (idempotent)."""

    def render(self, spec: RenderSpec, *, on_step: StepCallback | None = None,
               should_stop: StopCheck | None = None) -> RenderResult:
        """Render one image. Applies/swaps `spec.lora` in place (no base-model reload)."""

    def unload(self) -> None:
        """Release the model and its device memory."""
