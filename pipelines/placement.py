"""Carrying out a memory plan (previewd.pipelines.memory) on a loaded model.

The adapters ask a `Placer` where each component's weights should be loaded (straight to their
device: no full copy in host memory first), install the offload hooks the placement needs after
loading, and bracket the stages of a render with it:
- `te_offload`: the text encoder lives in host memory and comes to the device only inside
  `encoding()` (prompt embeddings are cached, so that is once per prompt); when the plan says the
  two do not fit together, the transformer steps off the device meanwhile;
- `model_offload`: diffusers' model CPU offload (Qwen) or `stage()` (FLUX.2, whose sampler is its
  own): one component on the device at a time;
- `group_offload`: diffusers' group offloading of the transformer (block by block) and the text
  encoder (layer by layer), with a CUDA stream prefetching the next group.
Moving weights between devices is exact, so a placement never changes pixels by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch

from previewd.pipelines.memory import MemoryPlan

log = logging.getLogger(__name__)

OFFLOAD_DEVICE = "cpu"

_LOADED_ON_DEVICE = {
    "resident": {"text_encoder", "transformer", "vae"},
    "te_offload": {"transformer", "vae"},
    "model_offload": set(),
    "group_offload": {"vae"},
}


class Placer:
    def __init__(self, plan: MemoryPlan | None, device: str, *, offload_device: str = OFFLOAD_DEVICE):
        self.plan = plan
        self.placement = plan.placement if plan is not None else "resident"
        self.device = device
        self.offload_device = offload_device
        """Where offloaded weights live: host memory (tests use "meta" to prove they are not read)."""
        self._staged: dict[str, torch.nn.Module] = {}

    # -- loading --------------------------------------------------------------------------------

    def home(self, component: str) -> str:
        """Where `component`'s weights are loaded and kept between uses."""
        return self.device if component in _LOADED_ON_DEVICE[self.placement] else OFFLOAD_DEVICE

    def load_kwargs(self, component: str) -> dict:
        """from_pretrained arguments that put `component` straight where it lives. Nothing on the CPU
        (where from_pretrained puts weights anyway), nor for a component the plan holds quantised (for
        the run, or to fit): that is quantised in host memory, and only its quantised weights reach the
        device (`quantize_to_fit`)."""
        home = self.home(component)
        quantised = self.plan is not None and self.plan.precision.of(component) != "full"
        return {} if home == "cpu" or quantised else {"device_map": home}

    def _quantizes(self, component: str) -> bool:
        return self.plan is not None and self.plan.precision.of(component) != self.plan.run_precision.of(component)

    def quantize_to_fit(self, component: str, module: torch.nn.Module) -> None:
        """The plan's quantize_to_fit precision (qfloat8, optimum-quanto, every Linear: what ai-toolkit's
        qfloat8 runs do) on a full-precision component; then the component, quantised by whoever
        quantised it, to where it lives."""
        if self._quantizes(component):
            from optimum.quanto import freeze, qfloat8, quantize

            quantize(module, weights=qfloat8)
            freeze(module)
        module.to(self.home(component))

    # -- after loading --------------------------------------------------------------------------

    def install_pipeline(self, pipe) -> None:
        """Offload hooks on a diffusers pipeline (Qwen)."""
        if self.placement == "model_offload":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.placement == "group_offload":
            self._group_offload(pipe.transformer, pipe.text_encoder)

    def install_modules(self, *, text_encoder, transformer, vae) -> None:
        """Offload set-up for separately held components (FLUX.2)."""
        if self.placement == "model_offload":
            self._staged = {"text_encoder": text_encoder, "transformer": transformer, "vae": vae}
        elif self.placement == "group_offload":
            self._group_offload(transformer, text_encoder)

    def _group_offload(self, transformer, text_encoder) -> None:
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(transformer, onload_device=torch.device(self.device),
                               offload_device=torch.device(OFFLOAD_DEVICE), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=self._streams(transformer))
        # The text encoder's layers sit below its top level: stream it leaf by leaf.
        apply_group_offloading(text_encoder, onload_device=torch.device(self.device),
                               offload_device=torch.device(OFFLOAD_DEVICE), offload_type="leaf_level",
                               use_stream=self._streams(text_encoder))

    def _streams(self, module: torch.nn.Module) -> bool:
        """A CUDA stream overlaps the copy of the next group with the current one's compute. Not for
        optimum-quanto weights: the stream keeps pinned host copies made with pin_memory(), which quanto
        does not dispatch and answers with a dequantised bf16 tensor (twice the bytes, and no longer
        the qfloat8 weight that was sampled with); plain moves keep its tensors whole."""
        if not self.device.startswith("cuda"):
            return False
        from optimum.quanto import QTensor

        return not any(isinstance(param, QTensor) for param in module.parameters())

    # -- during a render ------------------------------------------------------------------------

    def stage(self, component: str) -> None:
        """Model offload for FLUX.2: `component` on the device, the others in host memory."""
        if not self._staged:
            return
        for name, module in self._staged.items():
            if name != component:
                module.to(OFFLOAD_DEVICE)
        self._staged[component].to(self.device)

    @contextmanager
    def encoding(self, text_encoder: torch.nn.Module, others: Iterable[torch.nn.Module] = ()) -> Iterator[None]:
        """The text encoder on the device for the duration (te_offload), then back home; the `others`
        step off meanwhile when the plan says they do not fit beside it."""
        if self.placement != "te_offload":
            yield
            return
        swap = [m for m in others if m is not None] if self.plan is not None and self.plan.swap_for_encode else []
        for module in swap:
            module.to(OFFLOAD_DEVICE)
        text_encoder.to(self.device)
        try:
            yield
        finally:
            text_encoder.to(self.offload_device)
            for module in swap:
                module.to(self.device)
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def record(self) -> dict:
        """What a render's record says about where the model ran."""
        if self.plan is None:
            return {"placement": self.placement}
        return {"placement": self.placement, "planned_peak_gib": round(self.plan.peak_bytes / 2**30, 2),
                "memory_parity_gap": self.plan.parity_gap}


class EncoderVisit:
    """One render's use of an offloaded text encoder: it comes to the device at the first prompt that
    is not in the embedding cache (`need`) and leaves when the visit ends, so a prompt and its negative
    cost one trip, and a render whose prompts are all cached none."""

    def __init__(self, bring: Callable[[], AbstractContextManager]):
        self._bring = bring
        self._stack = ExitStack()
        self._here = False

    def need(self) -> None:
        if not self._here:
            self._stack.enter_context(self._bring())
            self._here = True

    def __enter__(self) -> EncoderVisit:
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()


def from_pretrained(prebuilt: Callable[..., object] | None, component: str, cls, path, **kwargs):
    """`cls.from_pretrained(path, **kwargs)`, or, for models that have no files (bench/gpu.py's random
    real-size ones), `prebuilt(component, **kwargs)`: the same placement arguments either way."""
    if prebuilt is not None:
        return prebuilt(component, **kwargs)
    return cls.from_pretrained(path, **kwargs)
