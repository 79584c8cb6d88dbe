"""Memory plans: how many bytes each component of a model needs, and where it should live.

Sizes come from the model itself, never from a table: the safetensors headers of the model folder's
`transformer/`, `text_encoder/` and `vae/` (tensor shapes; every floating tensor is held in the run
dtype) when the model is on disk, else the component built from its config on the meta device
(`real_configs` holds the released configs). Activations are traced at 1024² on the meta device
(`memory_trace`). Quantised sizes follow the formats: qfloat8 (optimum-quanto) is one byte per weight
plus a per-row scale; uintN (ai-toolkit's torchao-compatible uintx, as previewd holds it) is one byte
per code plus a scale and a zero point per group of 64 inputs, and leaves layers whose input width is
not a multiple of 64 in full precision.

Placements, fastest first:
- `resident`: every component on the device;
- `te_offload`: the text encoder lives in host memory and comes to the device only for prompts not in
  the embedding cache (the transformer and VAE step off meanwhile when all do not fit); the
  transformer and VAE stay;
- `model_offload`: each component on the device only while it runs (diffusers' model CPU offload);
- `group_offload`: the transformer and text encoder stream through the device a block at a time
  (diffusers' group offloading), the VAE stays.
A full-precision run whose model fits none but the last may opt in (`memory.quantize_to_fit`) to a
qfloat8 transformer and text encoder instead; the render then records the parity gap.
On the CPU there is nothing to place: everything is `resident` there.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from previewd.catalog import MODELS
from previewd.config import PLACEMENTS, MemoryConfig
from previewd.pipelines.quantization import Quantization
from previewd.spec import ModelSource

COMPONENTS = ("text_encoder", "transformer", "vae")
GiB = 2 ** 30

QUANT_GROUP = 64
"""uintN quantises groups of 64 input columns (ai-toolkit's uintx_quant, torchao 0.10.0)."""
UINT_CODE_BYTES = 1
"""previewd's UIntXLinear (quantize.py) keeps each N-bit code in a byte (torchao packs them: N/8),
with a scale in the weight dtype and an int32 zero point per group."""
ZERO_POINT_BYTES = 4
PREFETCHED_BLOCKS = 2
"""Group offload with a CUDA stream holds the running block and the one being copied in."""
DEFAULT_LORA_RANK = 32
"""Planned LoRA rank when no checkpoint is at hand: the top of ai-toolkit's usual 16-32."""

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_HEADER_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                 "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:blocks|layers|transformer_blocks|single_transformer_blocks)\.\d+)\.")
_UINT = re.compile(r"^uint([2-8])$")


# -- what a component is made of --------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One repeated block of a component (or, with block=False, everything outside the blocks)."""

    name: str
    block: bool
    other: int
    """Bytes, at the run dtype, of every tensor that is not a Linear weight (biases, norms, embeddings,
    convolutions, buffers); quantisation leaves them as they are."""
    linears: tuple[tuple[int, int], ...] = ()
    """(out_features, in_features) of each Linear weight."""


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A Linear layer's weight, told by name and shape (token embeddings are the other 2-D weights)."""
    return len(shape) == 2 and name.endswith(".weight") and "embed_tokens" not in name


def linear_bytes(out: int, inp: int, precision: str, dtype_size: int) -> int:
    """Bytes of one Linear weight at `precision` ("full", "qfloat8" or "uint2".."uint8")."""
    if precision == "full":
        return out * inp * dtype_size
    if precision == "qfloat8":
        return out * inp + out * dtype_size
    bits = _UINT.match(precision)
    if bits is None:
        raise ValueError(f"unknown precision {precision!r} (full, qfloat8, uint2..uint8)")
    if inp % QUANT_GROUP:
        return out * inp * dtype_size
    return out * inp * UINT_CODE_BYTES + out * (inp // QUANT_GROUP) * (dtype_size + ZERO_POINT_BYTES)


@dataclass(frozen=True)
class ComponentSize:
    name: str
    parts: tuple[Part, ...]
    activations: int
    """Peak bytes of the component's forward at the planned size beyond its weights (traced)."""
    source: str

    def linears(self) -> Iterator[tuple[int, int]]:
        for part in self.parts:
            yield from part.linears

    def part_bytes(self, part: Part, precision: str, dtype_size: int, lora_rank: int = 0) -> int:
        weights = sum(linear_bytes(o, i, precision, dtype_size) for o, i in part.linears)
        # A LoRA takes the model dtype on a full-precision model (peft casts it); on a quantised one it
        # runs as ai-toolkit's fp32 branch.
        lora_size = dtype_size if precision == "full" else 4
        return part.other + weights + lora_rank * sum(o + i for o, i in part.linears) * lora_size

    def bytes(self, precision: str, dtype_size: int, lora_rank: int = 0) -> int:
        return sum(self.part_bytes(p, precision, dtype_size, lora_rank) for p in self.parts)

    def streamed_bytes(self, precision: str, dtype_size: int, lora_rank: int = 0) -> int:
        """On the device under group offload: what lies outside the blocks, and the prefetched blocks."""
        rest = sum(self.part_bytes(p, precision, dtype_size, lora_rank) for p in self.parts if not p.block)
        blocks = sorted((self.part_bytes(p, precision, dtype_size, lora_rank) for p in self.parts if p.block),
                        reverse=True)
        return rest + sum(blocks[:PREFETCHED_BLOCKS])

    def largest_linear(self) -> int:
        return max((o * i for o, i in self.linears()), default=0)

    def working_bytes(self, precision: str, dtype_size: int) -> int:
        """Activations, plus the dequantised copy of one weight a quantised layer builds per call."""
        extra = 0 if precision == "full" else self.largest_linear() * dtype_size
        return self.activations + extra


def _parts(tensors: Iterable[tuple[str, tuple[int, ...], int]]) -> tuple[Part, ...]:
    """Group (name, shape, bytes at the run dtype) into blocks and the rest."""
    other: dict[str, int] = {}
    linears: dict[str, list[tuple[int, int]]] = {}
    for name, shape, size in tensors:
        match = _BLOCK.match(name)
        key = match.group(1) if match else ""
        other.setdefault(key, 0)
        linears.setdefault(key, [])
        if is_linear_weight(name, shape):
            linears[key].append((shape[0], shape[1]))
        else:
            other[key] += size
    return tuple(Part(name=key, block=bool(key), other=other[key], linears=tuple(linears[key]))
                 for key in sorted(other))


def _held_bytes(numel: int, floating: bool, itemsize: int, dtype_size: int) -> int:
    # from_pretrained(torch_dtype=...) and .to(dtype) cast floating tensors; integer buffers keep theirs.
    return numel * (dtype_size if floating else itemsize)


def parts_from_module(module, dtype_size: int) -> tuple[Part, ...]:
    """Parts of a (meta-device) module: its parameters and buffers."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return _parts((name, tuple(t.shape), _held_bytes(t.numel(), t.is_floating_point(), t.element_size(), dtype_size))
                  for name, t in tensors)


def parts_from_headers(files: Iterable[Path], dtype_size: int) -> tuple[Part, ...]:
    """Parts of a component from its safetensors headers (no tensor is read)."""
    from previewd.intake.safetensors_header import read_header

    tensors = []
    for file in files:
        header, _metadata = read_header(file)
        for name, entry in header.items():
            shape = tuple(entry["shape"])
            kind = entry["dtype"]
            tensors.append((name, shape, _held_bytes(math.prod(shape), kind.startswith(("F", "BF")),
                                                     _HEADER_BYTES.get(kind, 4), dtype_size)))
    return _parts(tensors)


# -- where the components come from ---------------------------------------------------------

@dataclass(frozen=True)
class ComponentOrigin:
    config: dict
    files: tuple[Path, ...]
    where: str


def _component_folders(model_id: str, source: ModelSource) -> dict[str, Path] | None:
    from previewd.errors import PreviewdError
    from previewd.pipelines.model_sources import resolve_source

    # A model not on this machine is planned from its released config (the caller says so).
    try:
        root = resolve_source(source.path)
    except PreviewdError:
        return None
    folders = {name: root / name for name in COMPONENTS}
    if source.text_encoder:
        try:
            te_root = resolve_source(source.text_encoder)
        except PreviewdError:
            return None
        folders["text_encoder"] = te_root / "text_encoder" if (te_root / "text_encoder").is_dir() else te_root
    return folders


def component_origins(model_id: str, source: ModelSource | None) -> dict[str, ComponentOrigin]:
    """Each component's config and safetensors files: from the model folder when it is on disk
    (config.json and headers), else the released config (real_configs) with no files."""
    from previewd.pipelines.real_configs import real_config

    folders = _component_folders(model_id, source) if source is not None else None
    origins = {}
    for name in COMPONENTS:
        folder = folders[name] if folders else None
        config_file = folder / "config.json" if folder else None
        if config_file is not None and config_file.is_file():
            files = tuple(sorted(folder.glob("*.safetensors")))
            where = f"safetensors headers in {folder}" if files else f"{config_file} on the meta device"
            origins[name] = ComponentOrigin(json.loads(config_file.read_text()), files, where)
        else:
            origins[name] = ComponentOrigin(real_config(model_id, name), (),
                                            f"released {MODELS[model_id].hub_id} config on the meta device")
    return origins


@lru_cache(maxsize=32)
def _measure(model_id: str, name: str, config_json: str, files: tuple[Path, ...], where: str, dtype: str,
             width: int, height: int) -> ComponentSize:
    import torch

    from previewd.pipelines.memory_trace import Workload, activation_bytes, default_workload
    from previewd.pipelines.real_configs import build

    torch_dtype = getattr(torch, dtype)
    module = build(MODELS[model_id].family, name, json.loads(config_json), torch_dtype)
    size = _DTYPE_BYTES[dtype]
    parts = parts_from_headers(files, size) if files else parts_from_module(module, size)
    load: Workload = default_workload(model_id, width, height)
    activations = activation_bytes(module, model_id, name, load, torch_dtype)
    return ComponentSize(name=name, parts=parts, activations=activations, source=where)


def measure(model_id: str, source: ModelSource | None, dtype: str, *, width: int = 1024,
            height: int = 1024) -> dict[str, ComponentSize]:
    """Sizes of `model_id`'s components (None: the released model, built on the meta device)."""
    return {name: _measure(model_id, name, json.dumps(origin.config, sort_keys=True), origin.files, origin.where,
                           dtype, width, height)
            for name, origin in component_origins(model_id, source).items()}


def measure_configs(model_id: str, configs: dict[str, dict], dtype: str, *, width: int = 1024,
                    height: int = 1024) -> dict[str, ComponentSize]:
    """Sizes of components given by their configs alone (bench/gpu.py's models have no files)."""
    return {name: _measure(model_id, name, json.dumps(configs[name], sort_keys=True), (), "config on the meta device",
                           dtype, width, height)
            for name in COMPONENTS}


def lora_rank_of(path: str | None) -> int:
    """The rank of a LoRA checkpoint, from its header; the planned default without one."""
    if path is None:
        return DEFAULT_LORA_RANK
    from previewd.intake.safetensors_header import read_header

    header, _ = read_header(path)
    ranks = [min(entry["shape"]) for key, entry in header.items() if len(entry.get("shape", ())) == 2]
    return max(ranks, default=0)


# -- plans ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """How the transformer and the text encoder are held: "full" or a quantised format."""

    transformer: str = "full"
    text_encoder: str = "full"
    ara_rank: int = 0
    """Rank of the accuracy-recovery adapter beside a uintN transformer (from its file; 0: none)."""

    def of(self, component: str) -> str:
        return getattr(self, component, "full")

    @property
    def quantized(self) -> bool:
        return self.transformer != "full" or self.text_encoder != "full"


@dataclass(frozen=True)
class MemorySettings:
    """The `memory:` config section, with `budget_gb: auto` already read from the device."""

    budget_bytes: int | None
    """None: no budget to respect (the CPU)."""
    placement: str = "auto"
    quantize_to_fit: str = "none"
    reserve_bytes: int = GiB


@dataclass(frozen=True)
class MemoryPlan:
    model_id: str
    device: str
    dtype: str
    placement: str
    precision: Precision
    run_precision: Precision
    """What the run itself was trained with; differs from `precision` when quantised to fit."""
    components: dict[str, int]
    """Bytes of each component as placed (weights at its precision, the transformer with its LoRA)."""
    activations: dict[str, int]
    phases: dict[str, int]
    """Device bytes while each stage runs: encode, denoise, decode (and lora merge)."""
    peak_bytes: int
    """Planned peak of device memory, reserve included."""
    host_bytes: int
    budget_bytes: int | None
    lora_rank: int
    swap_for_encode: bool = False
    """te_offload: the transformer and VAE leave the device while the text encoder runs."""
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.peak_bytes <= self.budget_bytes

    @property
    def parity_gap(self) -> str | None:
        """Why this render cannot match the run's own samples exactly, when the plan made it so."""
        if self.precision == self.run_precision:
            return None
        return (f"quantised to fit {self.budget_bytes / GiB:.0f} GiB: transformer {self.precision.transformer}, "
                f"text encoder {self.precision.text_encoder} (the run used {self.run_precision.transformer}/"
                f"{self.run_precision.text_encoder})")

    def summary(self) -> str:
        parts = ", ".join(f"{name} {size / GiB:.2f} GiB" for name, size in self.components.items())
        budget = "no budget" if self.budget_bytes is None else f"budget {self.budget_bytes / GiB:.1f} GiB"
        fits = "" if self.fits else " (DOES NOT FIT)"
        precision = "" if not self.precision.quantized else \
            f" [transformer {self.precision.transformer}, text encoder {self.precision.text_encoder}]"
        return (f"{self.model_id} on {self.device}: {self.placement}{precision}, planned peak "
                f"{self.peak_bytes / GiB:.1f} GiB of {budget}{fits}; host {self.host_bytes / GiB:.1f} GiB; {parts}")

    def table(self) -> str:
        """Components, bytes, and the phases, as `previewd plan` prints them."""
        rows = [f"{'component':14} {'GiB':>8} {'activations GiB':>16}  source"]
        for name in COMPONENTS:
            rows.append(f"{name:14} {self.components[name] / GiB:8.2f} {self.activations[name] / GiB:16.2f}  "
                        f"{self.sources.get(name, '')}")
        rows.append("phases (device GiB): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.phases.items()))
        rows.append(self.summary())
        if self.parity_gap:
            rows.append(f"parity gap: {self.parity_gap}")
        return "\n".join(rows)


def _evaluate(model_id: str, sizes: dict[str, ComponentSize], device: str, dtype: str, placement: str,
              precision: Precision, run_precision: Precision, lora_rank: int,
              settings: MemorySettings) -> MemoryPlan:
    size = _DTYPE_BYTES[dtype]
    te, tr, vae = sizes["text_encoder"], sizes["transformer"], sizes["vae"]
    weights = {"text_encoder": te.bytes(precision.text_encoder, size),
               "transformer": tr.bytes(precision.transformer, size, lora_rank),
               "vae": vae.bytes("full", size)}
    if precision.ara_rank:
        weights["transformer"] += precision.ara_rank * sum(o + i for o, i in tr.linears()) * size
    work = {"text_encoder": te.working_bytes(precision.text_encoder, size),
            "transformer": tr.working_bytes(precision.transformer, size),
            "vae": vae.working_bytes("full", size)}
    # ai-toolkit merges LoRAs into full-precision weights (previewd fuses or merges likewise): an fp32
    # delta and an fp32 copy of one weight live at once. Quantised runs keep the LoRA as a branch.
    merge = 2 * 4 * tr.largest_linear() if precision.transformer == "full" else 0
    te_w, tr_w, vae_w = weights["text_encoder"], weights["transformer"], weights["vae"]
    swap = False
    if placement == "resident":
        base = te_w + tr_w + vae_w
        phases = {"encode": base + work["text_encoder"], "denoise": base + max(work["transformer"], merge),
                  "decode": base + work["vae"]}
        host = 0
    elif placement == "te_offload":
        # The transformer and VAE step off while the encoder runs, unless all fit at once.
        together = te_w + tr_w + vae_w + work["text_encoder"]
        swap = settings.budget_bytes is not None and together + settings.reserve_bytes > settings.budget_bytes
        phases = {"encode": te_w + work["text_encoder"] if swap else together,
                  "denoise": tr_w + vae_w + max(work["transformer"], merge), "decode": tr_w + vae_w + work["vae"]}
        host = max(te_w, tr_w + vae_w) if swap else te_w
    elif placement == "model_offload":
        phases = {"encode": te_w + work["text_encoder"], "denoise": tr_w + max(work["transformer"], merge),
                  "decode": vae_w + work["vae"]}
        host = te_w + tr_w + vae_w
    else:
        # Merges happen where the offloaded weights are: in host memory.
        te_s = te.streamed_bytes(precision.text_encoder, size)
        tr_s = tr.streamed_bytes(precision.transformer, size, lora_rank)
        phases = {"encode": vae_w + te_s + work["text_encoder"], "denoise": vae_w + tr_s + work["transformer"],
                  "decode": vae_w + work["vae"]}
        host = te_w + tr_w
    peak = max(phases.values()) + settings.reserve_bytes
    return MemoryPlan(model_id=model_id, device=device, dtype=dtype, placement=placement, precision=precision,
                      run_precision=run_precision, components=weights, swap_for_encode=swap,
                      activations={n: sizes[n].activations for n in COMPONENTS}, phases=phases, peak_bytes=peak,
                      host_bytes=host, budget_bytes=settings.budget_bytes, lora_rank=lora_rank,
                      sources={n: sizes[n].source for n in COMPONENTS})


def choose(model_id: str, sizes: dict[str, ComponentSize], *, device: str, dtype: str, settings: MemorySettings,
           run_precision: Precision = Precision(), lora_rank: int = DEFAULT_LORA_RANK) -> MemoryPlan:
    """The fastest placement that fits the budget: the run's own precision first; then, when the
    settings allow it and the run is full precision, the quantised fallback before group offload."""
    def plan(placement: str, precision: Precision) -> MemoryPlan:
        return _evaluate(model_id, sizes, device, dtype, placement, precision, run_precision, lora_rank, settings)

    if not device.startswith("cuda") or settings.budget_bytes is None:
        return plan("resident", run_precision)
    fallback = None
    if settings.quantize_to_fit != "none" and not run_precision.quantized:
        fallback = replace(run_precision, transformer=settings.quantize_to_fit, text_encoder=settings.quantize_to_fit)
    if settings.placement != "auto":
        fixed = plan(settings.placement, run_precision)
        if fixed.fits or fallback is None:
            return fixed
        return plan(settings.placement, fallback)
    fast = [p for p in PLACEMENTS if p != "group_offload"]
    for precision in (run_precision, fallback):
        if precision is None:
            continue
        for placement in fast:
            candidate = plan(placement, precision)
            if candidate.fits:
                return candidate
    return plan("group_offload", run_precision)


def plan_model(model_id: str, source: ModelSource | None, *, device: str, dtype: str, settings: MemorySettings,
               run_precision: Precision = Precision(), lora_path: str | None = None) -> MemoryPlan:
    """Measure `model_id` (from `source`, or the released config) and choose its placement."""
    sizes = measure(model_id, source, dtype)
    return choose(model_id, sizes, device=device, dtype=dtype, settings=settings, run_precision=run_precision,
                  lora_rank=lora_rank_of(lora_path))


def quantization_precision(quantization: Quantization) -> Precision:
    """The precision of a loaded model's quantisation (what the run sampled with); the accuracy
    recovery adapter's rank is read from its file when it is a local one."""
    ara = quantization.ara
    return Precision(transformer=quantization.transformer or "full", text_encoder=quantization.text_encoder or "full",
                     ara_rank=lora_rank_of(ara) if ara and Path(ara).is_file() else 0)


def settings_for(memory: MemoryConfig, device: str) -> MemorySettings:
    """MemorySettings from the config's `memory:` section; `budget_gb: auto` reads the device's free memory."""
    from previewd.pipelines.device import free_bytes

    if memory.budget_gb == "auto":
        budget = free_bytes(device)
    else:
        budget = int(memory.budget_gb * GiB) if device.startswith("cuda") else None
    return MemorySettings(budget_bytes=budget, placement=memory.placement, quantize_to_fit=memory.quantize_to_fit,
                          reserve_bytes=int(memory.reserve_gb * GiB))
