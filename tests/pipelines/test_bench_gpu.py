"""bench/gpu.py's smoke run: the real-size benchmark's code path at tiny shapes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
KEYS = {"model", "placement", "device", "dtype", "size", "steps", "lora_rank", "planned_peak_gib", "load_s",
        "render_s", "lora_switch_s", "sweep", "naive_sweep_s", "peak_host_rss_gib"}


@pytest.mark.slow
def test_smoke_run_prints_one_json_object_per_model_and_placement():
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--model", "qwen_image_2512", "--model", "flux2",
                           "--checkpoints", "2", "--prompts", "2"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["model"], r["placement"]) for r in results] == [
        (m, p) for m in ("qwen_image_2512", "flux2") for p in ("resident", "te_offload")]
    for result in results:
        assert KEYS <= set(result) and result["smoke"] and result["device"] == "cpu"
        assert result["sweep"]["images"] == 4 and result["sweep"]["checkpoints"] == 2
        assert result["render_s"] > 0 and result["naive_sweep_s"] > 0
