"""Real-size models with random weights, built straight on the device, rendered through previewd's
adapters: what each placement costs on this machine.

    .venv/bin/python bench/gpu.py                               # every model, every placement that fits
    .venv/bin/python bench/gpu.py --model qwen_image_2512 --placement te_offload
    .venv/bin/python bench/gpu.py --smoke                       # CPU, tiny shapes, seconds (CI)
    python3 bench/gpu.py --pair qwen_image_2512:resident --pair flux2:resident --budget-seconds 420
                                                                # what fits a short lease, in this order

The architectures are the released ones (previewd.pipelines.real_configs); no weights are downloaded:
each component is initialised randomly where the memory plan puts it. LoRAs are random too, in
ai-toolkit's file format and shape: rank 32 on every Linear of every transformer block. Prints one
JSON object per (model, placement): load seconds, seconds per image, LoRA switch seconds, peak device
memory, peak host RSS, and a checkpoints x prompts sweep against a naive script that reloads the
model for every checkpoint. Each (model, placement) runs in its own process, so peaks are its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from previewd import pipelines
from previewd.catalog import MODELS
from previewd.config import PLACEMENTS
from previewd.pipelines.memory import COMPONENTS, GiB, MemorySettings, choose, measure_configs, quantization_precision
from previewd.pipelines.quantization import Quantization
from previewd.pipelines.real_configs import build, real_config
from previewd.spec import MODEL_IDS, AitkOptions, ControlImage, LoraSpec, ModelSource, RenderSpec

PROMPTS = ("a red fox sitting in fresh snow, golden hour", "a lighthouse on a cliff at dusk",
           "a bowl of ramen on a wooden table, steam rising", "an astronaut reading a newspaper on the moon")
SHORT_STEPS = 2
"""Steps of the renders that are not timed as a whole (the warm-up, the LoRA switch)."""
SMOKE_PLACEMENTS = ("resident", "te_offload")
"""On the CPU the device and host memory are one: the other placements' hooks need a GPU to mean anything
(`--smoke --device cuda` runs them all, at tiny shapes: every GPU-only code path in seconds)."""


# -- the models -------------------------------------------------------------------------------

def component_configs(model_id: str, smoke: bool) -> dict[str, dict]:
    """Released configs, or the tiny test models' shapes for --smoke."""
    if not smoke:
        return {name: real_config(model_id, name) for name in COMPONENTS}
    if MODELS[model_id].family == "flux2":
        from previewd.pipelines.tiny import flux2 as tiny

        return {"transformer": dict(tiny.TRANSFORMER), "vae": dict(tiny.VAE),
                "text_encoder": {"text_config": tiny.TEXT_CONFIG, "vision_config": tiny.VISION_CONFIG,
                                 "image_token_index": 7, "vision_feature_layer": -1, "spatial_merge_size": 1}}
    from previewd.pipelines.tiny import qwen as tiny

    transformer = dict(tiny.TRANSFORMER, zero_cond_t=model_id.endswith("2511"))
    latents = tiny.VAE["z_dim"]
    vae = dict(tiny.VAE, latents_mean=[0.0] * latents, latents_std=[1.0] * latents)
    return {"transformer": transformer, "vae": vae, "text_encoder": dict(tiny.TEXT_ENCODER)}


def builder(adapter, configs: dict[str, dict], dtype: torch.dtype):
    """The adapter's `prebuilt` hook (placement.from_pretrained): each component with random weights,
    built where the plan loads it (`device_map`, else host memory)."""
    family = MODELS[adapter.model_id].family

    def prebuilt(component: str, **kwargs):
        if component == "processor":  # FLUX.2's Mistral processor; any tokenizer serves random weights
            from previewd.pipelines.tiny import flux2 as tiny

            return tiny._processor()
        if component != "pipeline":
            return build(family, component, configs[component], dtype, kwargs.get("device_map", "cpu")).eval()
        # Qwen: the pipeline around the components the adapter had placed, the others in host memory.
        from diffusers import FlowMatchEulerDiscreteScheduler

        from previewd.pipelines.tiny import qwen as tiny

        parts = {name: kwargs.get(name) or prebuilt(name) for name in COMPONENTS}
        tokenizer = tiny._tokenizer()
        if adapter.control_kind != "none":
            from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

            parts["processor"] = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                                  video_processor=Qwen2VLVideoProcessor())
        return adapter._pipeline_class()(scheduler=FlowMatchEulerDiscreteScheduler(**tiny.SCHEDULER),
                                         tokenizer=tokenizer, **parts)

    return prebuilt


def write_loras(model_id: str, transformer_config: dict, folder: Path, count: int, rank: int) -> list[Path]:
    """`count` random checkpoints in ai-toolkit's format: every Linear of every transformer block."""
    if MODELS[model_id].family == "flux2":
        from previewd.pipelines.tiny.flux2 import bfl_lora_shapes

        shapes = bfl_lora_shapes(transformer_config)
    else:
        meta = build("qwen", "transformer", transformer_config)
        shapes = {name: (m.out_features, m.in_features) for name, m in meta.named_modules()
                  if isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks.")}
    paths = []
    for index in range(count):
        generator = torch.Generator("cpu").manual_seed(index)
        tensors = {}
        for module, (out_features, in_features) in sorted(shapes.items()):
            tensors[f"diffusion_model.{module}.lora_A.weight"] = (
                torch.randn(rank, in_features, generator=generator) / in_features ** 0.5).to(torch.bfloat16)
            tensors[f"diffusion_model.{module}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.1 / rank ** 0.5).to(torch.bfloat16)
        path = folder / f"{model_id}_{index:02d}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        paths.append(path)
    return paths


def controls(model_id: str, folder: Path, size: int) -> tuple[ControlImage, ...]:
    import numpy as np
    from PIL import Image

    kind = MODELS[model_id].control
    if kind == "none":
        return ()
    path = folder / "control.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return (ControlImage(slot="ctrl_img" if kind == "single" else "ctrl_img_1", path=str(path)),)


# -- one (model, placement) -----------------------------------------------------------------

class Run:
    def __init__(self, args, model_id: str, placement: str, folder: Path):
        self.args, self.model_id, self.placement, self.folder = args, model_id, placement, folder
        self.device = args.device
        self.dtype_name = "float32" if args.smoke and args.device == "cpu" else "bfloat16"
        self.dtype = getattr(torch, self.dtype_name)
        self.configs = component_configs(model_id, args.smoke)
        self.sizes = measure_configs(model_id, self.configs, self.dtype_name)
        # As ai-toolkit's qfloat8 runs sample: transformer and text encoder in qfloat8, the LoRA a runtime branch.
        self.quantization = Quantization(transformer=args.quantize, text_encoder=args.quantize)
        self.aitk = AitkOptions(quantize=True, qtype=args.quantize, quantize_te=True, qtype_te=args.quantize) \
            if args.quantize else AitkOptions()

    def plan(self):
        """The plan for this placement, on this device's whole memory."""
        total = torch.cuda.get_device_properties(self.device).total_memory if self.device.startswith("cuda") else None
        settings = MemorySettings(budget_bytes=total or 10 ** 15, placement=self.placement)
        # Planned as for a GPU even in --smoke, so that the plan carries the placement asked for.
        return choose(self.model_id, self.sizes, device="cuda", dtype=self.dtype_name, settings=settings,
                      run_precision=quantization_precision(self.quantization), lora_rank=self.args.rank)

    def adapter(self, plan):
        adapter = pipelines.create(self.model_id, ModelSource(path=str(self.folder)), device=self.device,
                                   dtype=self.dtype_name, quantization=self.quantization)
        adapter.plan = plan
        adapter.prebuilt = builder(adapter, self.configs, self.dtype)
        return adapter

    def spec(self, prompt: str, lora: Path, steps: int) -> RenderSpec:
        size = self.args.size
        return RenderSpec(model=self.model_id, prompt=prompt, width=size, height=size, sample_steps=steps, seed=1,
                          control_images=controls(self.model_id, self.folder, size), aitk=self.aitk,
                          lora=LoraSpec(path=str(lora), sha256=lora.stem))

    def measure(self) -> dict:
        args = self.args
        plan = self.plan()
        result = {"model": self.model_id, "placement": self.placement, "device": self.device,
                  "dtype": self.dtype_name, "size": args.size, "steps": args.steps, "lora_rank": args.rank,
                  "quantize": args.quantize, "planned_peak_gib": round(plan.peak_bytes / GiB, 2), "smoke": args.smoke}
        if not plan.fits:
            return {**result, "skipped": f"planned peak {plan.peak_bytes / GiB:.1f} GiB does not fit this device"}
        loras = write_loras(self.model_id, self.configs["transformer"], self.folder, args.checkpoints, args.rank)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        adapter = self.adapter(plan)
        started = time.perf_counter()
        adapter.load()
        result["load_s"] = time.perf_counter() - started
        adapter.render(self.spec(PROMPTS[0], loras[0], SHORT_STEPS))  # warm-up: kernels, the prompt cache
        started = time.perf_counter()
        adapter.render(self.spec(PROMPTS[0], loras[0], args.steps).model_copy(update={"seed": 2}))
        result["render_s"] = time.perf_counter() - started
        switched = adapter.render(self.spec(PROMPTS[0], loras[1], SHORT_STEPS))  # the switch is timed on its own
        result["lora_switch_s"] = switched.timings["lora"]
        result["rendered_as"] = {"quantization": switched.record.get("quantization"), "lora": switched.record.get("lora")}
        result["sweep"] = self.sweep(adapter, loras)
        if self.device.startswith("cuda"):
            result["peak_device_gib"] = torch.cuda.max_memory_allocated(self.device) / GiB
            result["peak_device_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GiB
        adapter.unload()
        result["naive_sweep_s"] = self.naive_sweep(plan, loras)
        result["peak_host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        return result

    def _sweep_specs(self, loras: list[Path]):
        prompts = PROMPTS[: self.args.prompts]
        return [[self.spec(p, lora, self.args.sweep_steps) for p in prompts] for lora in loras]

    def sweep(self, adapter, loras: list[Path]) -> dict:
        """previewd's way: one loaded model, one LoRA switch per checkpoint, prompts encoded once."""
        started = time.perf_counter()
        images = 0
        for specs in self._sweep_specs(loras):
            for spec in specs:
                adapter.render(spec)
                images += 1
        return {"checkpoints": len(loras), "prompts": self.args.prompts, "steps": self.args.sweep_steps,
                "images": images, "previewd_s": time.perf_counter() - started}

    def naive_sweep(self, plan, loras: list[Path]) -> float:
        """A script that loads the model afresh for every checkpoint (here: random initialisation on the
        device, which is faster than reading the weights a real reload reads)."""
        started = time.perf_counter()
        for specs in self._sweep_specs(loras):
            adapter = self.adapter(plan)
            adapter.load()
            for spec in specs:
                adapter.render(spec)
            adapter.unload()
        return time.perf_counter() - started


# -- command line -----------------------------------------------------------------------------

def _one(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(Run(args, args.model[0], args.placement[0], Path(tmp)).measure()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODEL_IDS)
    parser.add_argument("--placement", action="append", choices=PLACEMENTS)
    parser.add_argument("--device", help="default: cuda; cpu with --smoke")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (on the CPU unless --device cuda), for CI")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sweep-steps", type=int, help="steps of the sweep's images")
    parser.add_argument("--checkpoints", type=int)
    parser.add_argument("--prompts", type=int, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--rank", type=int, help="LoRA rank (default 32; 4 with --smoke)")
    parser.add_argument("--quantize", choices=["qfloat8"],
                        help="render as ai-toolkit samples a qfloat8 run (transformer and text encoder)")
    parser.add_argument("--pair", action="append", metavar="MODEL:PLACEMENT", type=_pair,
                        help="run these (model, placement) pairs, in this order, instead of --model x --placement")
    parser.add_argument("--budget-seconds", type=float,
                        help="stop a pair that would run past this many seconds from the start, and skip the rest")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = dict(size=64, steps=2, sweep_steps=2, checkpoints=3, prompts=2, rank=4) if args.smoke else \
        dict(size=1024, steps=25, sweep_steps=8, checkpoints=10, prompts=4, rank=32)
    defaults["device"] = "cpu" if args.smoke else "cuda"
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.one:
        _one(args)
        return 0
    models = args.model or [m for m in MODEL_IDS if m != "qwen_image"]
    cpu_smoke = args.smoke and not args.device.startswith("cuda")
    placements = args.placement or (SMOKE_PLACEMENTS if cpu_smoke else PLACEMENTS)
    pairs = args.pair or [(m, p) for m in models for p in placements]
    deadline = time.monotonic() + args.budget_seconds if args.budget_seconds else None
    failed = 0
    for model_id, placement in pairs:
        command = [sys.executable, __file__, "--one", "--model", model_id, "--placement", placement,
                   "--device", args.device, "--size", str(args.size), "--steps", str(args.steps),
                   "--sweep-steps", str(args.sweep_steps), "--checkpoints", str(args.checkpoints),
                   "--prompts", str(args.prompts), "--rank", str(args.rank)] + (["--smoke"] if args.smoke else []) + \
                  (["--quantize", args.quantize] if args.quantize else [])
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            print(json.dumps({"model": model_id, "placement": placement, "skipped": "out of --budget-seconds"}),
                  flush=True)
            continue
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired as exc:
            failed += 1
            print(json.dumps({"model": model_id, "placement": placement, "error": "ran past --budget-seconds",
                              "stderr": _text(exc.stderr)[-2000:]}), flush=True)
            continue
        if done.returncode:
            failed += 1
            print(json.dumps({"model": model_id, "placement": placement, "error": done.stderr[-2000:]}), flush=True)
        else:
            print(done.stdout.strip(), flush=True)
    return 1 if failed else 0


def _pair(text: str) -> tuple[str, str]:
    model_id, _, placement = text.partition(":")
    if model_id not in MODEL_IDS or placement not in PLACEMENTS:
        raise argparse.ArgumentTypeError(f"{text!r}: MODEL:PLACEMENT, models {', '.join(MODEL_IDS)}, placements "
                                         f"{', '.join(PLACEMENTS)}")
    return model_id, placement


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


if __name__ == "__main__":
    sys.exit(main())
