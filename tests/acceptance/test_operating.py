"""Operating previewd as a person would: a broken setup fails fast and visibly, logs stay readable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from previewd.config import load_config
from previewd.instance import EXAMPLE_RUN, render_config
from previewd.queue import JobState, JobStore

pytestmark = pytest.mark.slow


def _checkpoint(path: Path) -> None:
    save_file({"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((4, 16), np.float32),
               "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((16, 4), np.float32)},
              str(path), metadata={"format": "pt"})


def test_a_missing_model_fails_its_jobs_at_once_beside_the_run_without_retries(tmp_path):
    config_path = tmp_path / "config.yaml"
    text = render_config(settle_seconds=0.2, idle_poll_seconds=0.2)
    missing = tmp_path / "models" / "qwen_image_2512"
    config_path.write_text(text[: text.index("models:")] + f"models:\n  qwen_image_2512:\n    path: {missing}\n")
    config = load_config(config_path)
    run = config.inbox / "example_lora"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(EXAMPLE_RUN.format(training_folder=config.inbox))
    _checkpoint(run / "example_lora_000000250.safetensors")

    done = subprocess.run([sys.executable, "-m", "previewd", "run", "-c", str(config_path), "--exit-when-idle"],
                          capture_output=True, text=True, timeout=300)
    log = done.stderr
    assert done.returncode == 1, log[-3000:]  # a batch run notices renders that will never appear
    with JobStore(config.db_url) as store:
        jobs = store.list_jobs()
        assert len(jobs) == 2 and {j.state for j in jobs} == {JobState.FAILED}
        assert all(j.attempts == 1 for j in jobs)
        assert all(j.last_error == f"ModelNotFound: qwen_image_2512: {missing}: no such folder" for j in jobs)
    beside_the_run = (run / "previews.error.txt").read_text()
    assert f"qwen_image_2512: {missing}: no such folder" in beside_the_run
    # Said at start-up, once per job after: no traceback, no retry loop, no escape codes.
    assert "Traceback" not in log and "\x1b" not in log
    assert f"model qwen_image_2512: {missing}: no such folder" in log
    assert sum("ModelNotFound" in line for line in log.splitlines()) == 2
    lines = [line.split(" ", 2)[-1] for line in log.splitlines()]  # without the timestamp
    assert len(lines) == len(set(lines)), "a log line is repeated"


def test_status_shows_the_phase_and_a_growing_step_count_with_an_eta(tmp_path, tiny_model):
    import json
    import time

    model = tiny_model("qwen_image_2512")
    config_path = tmp_path / "config.yaml"
    text = render_config(settle_seconds=0.2, idle_poll_seconds=0.2)
    config_path.write_text(text[: text.index("models:")] + f"models:\n  qwen_image_2512:\n    path: {model}\n")
    config = load_config(config_path)
    config.inbox.mkdir(parents=True)
    (config.inbox / "long.yaml").write_text("model: qwen_image_2512\nprompts:\n  - prompt: a fox\n    width: 64\n"
                                            "    height: 64\n    sample_steps: 150\n")
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "previewd", "run", "-c", str(config_path), "--exit-when-idle"],
                              stdout=log, stderr=subprocess.STDOUT)
    seen = []
    try:
        deadline = time.monotonic() + 240
        while daemon.poll() is None and time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-m", "previewd", "status", "-c", str(config_path), "--json"],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                for job in json.loads(out.stdout)["running"]:
                    seen.append((job["phase"], job["denoise_step"], job["denoise_steps"], job["eta_seconds"]))
            time.sleep(0.1)
        assert daemon.wait(timeout=60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        daemon.kill()
    denoising = [s for s in seen if s[0] == "denoising"]
    assert len({step for _phase, step, _n, _eta in denoising}) >= 2, seen
    steps = [step for _phase, step, _n, _eta in denoising]
    assert steps == sorted(steps) and all(n == 150 for _p, _s, n, _e in denoising)
    assert all(eta is not None and eta >= 0 for *_rest, eta in denoising if _rest[1])
    known = {"starting", "loading model", "encoding prompts", "denoising", "decoding", "writing"}
    assert {s[0] for s in seen} <= known
