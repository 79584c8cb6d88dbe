"""Render timings and memory per model, through the same registry the daemon uses.

    .venv/bin/python bench/render.py                      # tiny random-weight models on this machine
    .venv/bin/python bench/render.py -c config.yaml --model qwen_image_2512 --size 1024 --steps 25

Prints, per model: load time, first render, steady render (mean of the rest), LoRA swap + render,
and peak RSS (and peak CUDA memory on a GPU). Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from previewd import pipelines
from previewd.catalog import MODELS
from previewd.spec import MODEL_IDS, ControlImage, LoraSpec, ModelSource, RenderSpec


def _controls(model_id: str, folder: Path, size: int) -> tuple[ControlImage, ...]:
    kind = MODELS[model_id].control
    if kind == "none":
        return ()
    path = folder / f"ctrl_{size}.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return (ControlImage(slot="ctrl_img" if kind == "single" else "ctrl_img_1", path=str(path)),)


def _loras(model_id: str, model_dir: Path, folder: Path) -> list[LoraSpec]:
    """Two tiny checkpoints in ai-toolkit's format, only for the tiny models this script builds."""
    from previewd.pipelines.tiny.flux2 import write_bfl_lora
    from previewd.pipelines.tiny.qwen import write_random_lora

    paths = []
    for seed in (1, 2):
        path = folder / f"{model_id}_{seed}.safetensors"
        if model_id == "flux2":
            write_bfl_lora(path, seed=seed)
        else:
            write_random_lora(model_dir, path, seed=seed)
        paths.append(LoraSpec(path=str(path), sha256=f"bench{seed}"))
    return paths


def bench(model_id: str, source: ModelSource, *, device: str, dtype: str, size: int, steps: int, repeat: int,
          loras: list[LoraSpec], scratch: Path) -> dict[str, float]:
    pipeline = pipelines.create(model_id, source, device=device, dtype=dtype)
    started = time.perf_counter()
    pipeline.load()
    figures = {"load_s": time.perf_counter() - started}
    spec = RenderSpec(model=model_id, prompt="a red fox in fresh snow", width=size, height=size,
                      sample_steps=steps, seed=1, control_images=_controls(model_id, scratch, size),
                      lora=loras[0] if loras else None)
    times = []
    for i in range(repeat):
        started = time.perf_counter()
        pipeline.render(spec.model_copy(update={"seed": i}))
        times.append(time.perf_counter() - started)
    figures["first_render_s"] = times[0]
    figures["steady_render_s"] = statistics.mean(times[1:]) if len(times) > 1 else times[0]
    if len(loras) > 1:
        started = time.perf_counter()
        pipeline.render(spec.model_copy(update={"lora": loras[1]}))
        figures["lora_swap_render_s"] = time.perf_counter() - started
    if str(getattr(pipeline, "device", "cpu")).startswith("cuda"):
        import torch

        figures["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    pipeline.unload()
    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", help="previewd config (its models.<id>.path); default: tiny models")
    parser.add_argument("--model", action="append", choices=MODEL_IDS)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model_ids = args.model or [m for m in MODEL_IDS if m != "qwen_image"]

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if args.config:
            from previewd.config import load_config

            config = load_config(args.config)
            device, dtype = config.device, config.dtype
            sources = {m: config.model_source(m) for m in model_ids}
            loras = {m: [] for m in model_ids}
        else:
            from previewd.pipelines.tiny import build_all

            device, dtype = "cpu", "float32"
            folders = build_all(scratch / "models", model_ids)
            sources = {m: ModelSource(path=str(folders[m])) for m in model_ids}
            loras = {m: _loras(m, folders[m], scratch) for m in model_ids}
        print(f"{'model':28} {'load s':>8} {'first s':>8} {'steady s':>9} {'swap s':>8} {'RSS GiB':>8}")
        for model_id in model_ids:
            f = bench(model_id, sources[model_id], device=device, dtype=dtype, size=args.size, steps=args.steps,
                      repeat=args.repeat, loras=loras[model_id], scratch=scratch)
            print(f"{model_id:28} {f['load_s']:8.2f} {f['first_render_s']:8.2f} {f['steady_render_s']:9.2f} "
                  f"{f.get('lora_swap_render_s', float('nan')):8.2f} {f['peak_rss_gib']:8.2f}"
                  + (f"  CUDA peak {f['peak_cuda_gib']:.1f} GiB" if "peak_cuda_gib" in f else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
