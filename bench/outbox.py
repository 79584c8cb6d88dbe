"""What the outbox costs per render, over short and long runs, and what it adds to a render loop.

    .venv/bin/python bench/outbox.py                          # 40 and 2,000 renders of 512² images
    .venv/bin/python bench/outbox.py --renders 40 400 --size 1024 --prompts 6 --tiny 0

Part 1 writes runs of N renders (checkpoints × `--prompts` prompts, one folder each) as the worker
does, and prints over the last 40 renders of each run: the render thread's time per render (the
image with its record, written now, and the hand-over), and the writer's time per render
(manifest.json, manifest.js, grid.png, page; its busy time divided by the renders it folded).
Part 2 times the render loop of a tiny model with and without the outbox. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from previewd import outbox
from previewd.manifest import RenderEntry
from previewd.outbox import folder as folders
from previewd.tasks import OutputTarget, RenderTask, image_name

WINDOW = 40
"""Renders the per-render figures are taken over: the last ones of each run."""


class FoldClock:
    """Busy time of the writer's folds, and the renders each one took in."""

    def __init__(self) -> None:
        self.folds: list[tuple[float, int]] = []
        self._real = folders.Folder.fold
        clock = self

        def timed(folder, ops, **options):
            started = time.perf_counter()
            clock._real(folder, ops, **options)
            clock.folds.append((time.perf_counter() - started, sum(isinstance(op, folders.RenderOp) for op in ops)))

        folders.Folder.fold = timed

    def per_render(self, last: int) -> float:
        """Writer seconds per render over the folds that took in the last `last` renders."""
        seconds = renders = 0
        for took, count in reversed(self.folds):
            seconds, renders = seconds + took, renders + count
            if renders >= last:
                break
        return seconds / max(renders, 1)


def _pictures(prompts: int, size: int) -> list[Image.Image]:
    # Smooth pictures with grain compress like renders do; noise alone would overstate encoding.
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    out = []
    for p in range(prompts):
        base = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp[::-1], ramp) / 2,
                         np.full((size, size), 40.0 * p % 256)], axis=-1)
        grain = rng.normal(0, 6, (size, size, 3))
        out.append(Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)))
    return out


def run_outbox(folder: Path, renders: int, prompts: int, size: int) -> dict[str, float]:
    clock = FoldClock()
    pictures = _pictures(prompts, size)
    hot: list[float] = []
    started = time.perf_counter()
    for n in range(renders):
        step, index = (n // prompts + 1) * 250, n % prompts
        checkpoint = f"run_{step:09d}.safetensors"
        target = OutputTarget(out_dir=str(folder), image_name=image_name(step, checkpoint, index, "png"), title="bench",
                              source=str(folder / "config.yaml"), checkpoint=checkpoint, step=step, prompt_index=index)
        entry = RenderEntry(model="qwen_image_2512", checkpoint=checkpoint, step=step, prompt_index=index,
                            prompt=f"prompt {index}: a lighthouse on a cliff at dusk, volumetric light", seed=42,
                            width=size, height=size, sample_steps=25, guidance_scale=4.0, network_multiplier=1.0,
                            parity="aitk", record={"scheduler": "FlowMatchEulerDiscreteScheduler", "lora": "merged"},
                            timings={"render": 10.0}, versions={"previewd": "0.1.0", "torch": "2.x"})
        t0 = time.perf_counter()
        outbox.write_render(target, pictures[index], entry)
        hot.append(time.perf_counter() - t0)
    loop = time.perf_counter() - started
    t0 = time.perf_counter()
    outbox.flush()
    tail = time.perf_counter() - t0
    folders.Folder.fold = clock._real
    busy = sum(took for took, _n in clock.folds)
    return {"renders": renders, "hot_ms": 1000 * statistics.mean(hot[-WINDOW:]),
            "writer_ms": 1000 * clock.per_render(WINDOW), "last_fold_ms": 1000 * clock.folds[-1][0],
            "folds": len(clock.folds), "writer_share": busy / (loop + tail), "final_flush_s": tail}


def run_tiny(scratch: Path, renders: int, rounds: int = 3) -> dict[str, float]:
    """The render loop of the tiny Qwen-Image at 64², 2 steps, without and with the outbox, in
    alternating rounds (the fastest of each kind counts: other work on the machine only adds)."""
    from previewd.config import load_config
    from previewd.instance import render_config
    from previewd.pipelines.tiny import build_all
    from previewd.spec import RenderSpec
    from previewd.worker import Renderer

    models = build_all(scratch / "models", ["qwen_image_2512"])
    (scratch / "config.yaml").write_text(render_config(tiny_models_dir=str(models["qwen_image_2512"].parent)))
    config = load_config(scratch / "config.yaml")
    renderer = Renderer(config)
    tasks = [RenderTask(spec=RenderSpec(model="qwen_image_2512", prompt=f"prompt {n % 6}", width=64, height=64,
                                        sample_steps=2),
                        target=OutputTarget(out_dir=str(scratch / "tiny"), image_name=image_name(None, None, n, "png"),
                                            title="tiny", source="bench", prompt_index=n))
             for n in range(renders)]
    for task in tasks:  # load, and fill the prompt-embedding cache
        renderer.render(task)
    walls: dict[bool, list[float]] = {False: [], True: []}
    writes: list[float] = []
    for _round in range(rounds):
        for with_outbox in (False, True):
            started = time.perf_counter()
            for task in tasks:
                result = renderer.render(task)
                if with_outbox:
                    t0 = time.perf_counter()
                    renderer.write(task, result)
                    writes.append(time.perf_counter() - t0)
            walls[with_outbox].append(time.perf_counter() - started)
            outbox.flush()
    renderer.close()
    return {"without_s": min(walls[False]), "with_s": min(walls[True]), "write_ms": 1000 * statistics.median(writes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, nargs="+", default=[40, 2000])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tiny", type=int, default=24, help="renders of the tiny-model loop (0: skip it)")
    args = parser.parse_args(argv)
    print(f"outbox, {args.size}² PNG renders, {args.prompts} prompts per checkpoint, renders back to back "
          f"(figures per render over the last {WINDOW}):")
    print(f"{'renders':>8} {'render thread ms':>17} {'writer ms':>10} {'last fold ms':>13} {'folds':>6} "
          f"{'writer share':>13} {'final flush s':>14}")
    with tempfile.TemporaryDirectory(prefix="previewd-bench-") as scratch:
        for renders in args.renders:
            row = run_outbox(Path(scratch) / f"run{renders}", renders, args.prompts, args.size)
            print(f"{row['renders']:>8} {row['hot_ms']:>17.1f} {row['writer_ms']:>10.1f} {row['last_fold_ms']:>13.1f} "
                  f"{row['folds']:>6} {row['writer_share']:>12.0%} {row['final_flush_s']:>14.2f}", flush=True)
        if args.tiny:
            tiny = run_tiny(Path(scratch), args.tiny)
            print(f"\ntiny qwen_image_2512 render loop, {args.tiny} renders at 64², 2 steps (fastest of 3 rounds): "
                  f"{tiny['without_s']:.2f} s without the outbox, {tiny['with_s']:.2f} s with it "
                  f"({100 * (tiny['with_s'] / tiny['without_s'] - 1):+.0f}%); the render thread's write: "
                  f"{tiny['write_ms']:.1f} ms per render (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
