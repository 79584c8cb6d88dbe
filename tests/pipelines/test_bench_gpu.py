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


@pytest.mark.slow
def test_pairs_run_in_the_order_given_and_the_budget_stops_them():
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--pair", "flux2:resident", "--pair",
                           "qwen_image_2512:te_offload", "--budget-seconds", "0.5"], capture_output=True, text=True,
                          timeout=300)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 1
    assert [(r["model"], r["placement"]) for r in results] == [("flux2", "resident"), ("qwen_image_2512", "te_offload")]
    assert results[0]["error"] == "ran past --budget-seconds" and results[1]["skipped"] == "out of --budget-seconds"
    refused = subprocess.run([sys.executable, str(BENCH), "--pair", "flux2"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "MODEL:PLACEMENT" in refused.stderr


@pytest.mark.slow
def test_a_qfloat8_run_is_benchmarked_as_ai_toolkit_samples_it():
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--quantize", "qfloat8", "--pair",
                           "qwen_image_2512:resident", "--checkpoints", "2", "--prompts", "1"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [result] = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    rendered = result["rendered_as"]
    assert result["quantize"] == "qfloat8" and rendered["lora"]["mode"] == "branch"
    assert rendered["quantization"]["transformer"] == rendered["quantization"]["text_encoder"] == "qfloat8"
