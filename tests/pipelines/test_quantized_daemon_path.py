"""Quantised goldens through the daemon's own path: a run config written as ai-toolkit writes it (or a
request's `aitk:` block) -> the Planner's tasks -> the worker's Renderer on the golden tiny models.

The run config carries the case's recorded `model:` settings (quantize, qtype with its adapter,
quantize_te, qtype_te, low_vram); nothing else tells previewd to quantise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from previewd.config import load_config
from previewd.intake.planner import Planner
from previewd.pipelines.quantization import Quantization
from previewd.worker import Renderer
from qwen_helpers import GOLDENS, expected_png, max_level_diff

pytestmark = [pytest.mark.golden, pytest.mark.slow]

TOLERANCE = {"flux2": 2}
"""Max difference in 8-bit levels: 1 for the Qwen family, 2 for FLUX.2 (as the golden tests)."""
RUN_CASES = [
    ("qwen_image_2512", "q04_lora1_m1_uint3_ara_te_qfloat8_64x64_g4_s3", "qwen_image:2512", "Qwen/Qwen-Image-2512"),
    ("qwen_image_edit_plus", "q03_lora1_m1_2ctrl_uint3_ara_te_qfloat8_64x64_g4_s3", "qwen_image_edit_plus",
     "Qwen/Qwen-Image-Edit-2509"),
    ("flux2", "q02_lora1_m1_qfloat8_te_qfloat8_64x64_g4_s3", "flux2", "black-forest-labs/FLUX.2-dev"),
]
REQUEST_CASES = [
    ("qwen_image_2512", "q06_lora1_m1_qfloat8_te_qfloat8_64x64_g4_s3_bf16"),
    ("flux2", "q03_lora1_m1_qfloat8_te_qfloat8_64x64_g4_s3_bf16"),
]
MODEL_DIRS = {"qwen_image_2512": "qwen_image", "qwen_image_edit_plus": "qwen_image_edit_plus", "flux2": "flux2"}


def case(model_id: str, case_id: str) -> dict:
    return json.loads((GOLDENS / "cases" / "aitk" / model_id / case_id / "request.json").read_text())


def daemon_config(tmp_path: Path, dtype: str):
    models = {mid: {"path": str(GOLDENS / "models" / folder), "quantize_text_encoder": "none"}
              for mid, folder in MODEL_DIRS.items()}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "inbox": str(tmp_path / "inbox"), "state_dir": str(tmp_path / "state"), "outbox_root": str(tmp_path / "out"),
        # ai-toolkit's working directory: the runs' relative adapter paths are relative to the goldens.
        "aitk_root": str(GOLDENS), "allowed_roots": [str(GOLDENS)],
        "device": "cpu", "dtype": dtype, "models": models}))
    (tmp_path / "inbox").mkdir()
    return load_config(tmp_path / "config.yaml")


def write_run(inbox: Path, request: dict, arch: str, name_or_path: str) -> Path:
    """training_folder/<name>/config.yaml as ai-toolkit writes it, and the case's LoRA as its step 250."""
    name = f"q_{request['model']}"
    sample = {"prompt": request["prompt"]}
    sample.update({slot: str(GOLDENS / item["file"]) for slot, item in request["control_images"].items()})
    process = {
        "type": "diffusion_trainer", "training_folder": str(inbox), "device": "cuda:0",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "save": {"dtype": "bf16", "save_every": 250, "max_step_saves_to_keep": 4},
        "train": {"batch_size": 1, "steps": 500, "lr": 0.0001, "dtype": "bf16"},
        "model": {"name_or_path": name_or_path, "arch": arch,
                  **{k: v for k, v in request["aitk"]["model_config"].items() if k != "dtype"}},
        "sample": {"sampler": "flowmatch", "sample_every": 250, "width": request["width"], "height": request["height"],
                   "neg": request["neg"], "seed": request["seed"], "walk_seed": False,
                   "guidance_scale": request["guidance"], "sample_steps": request["steps"], "samples": [sample]},
    }
    run = inbox / name
    run.mkdir()
    raw = {"job": "extension", "config": {"name": name, "process": [process]}, "meta": {"name": name}}
    (run / "config.yaml").write_text(yaml.dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    checkpoint = run / f"{name}_000000250.safetensors"
    shutil.copy(GOLDENS / request["lora"]["file"], checkpoint)
    return checkpoint


def render_and_compare(config, planned, model_id: str, case_id: str) -> None:
    assert not planned.rejected, [e.problems for e in planned.rejected]
    for path, data in planned.assets.items():  # what the dispatcher stores before it queues the tasks
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    [task] = planned.tasks
    renderer = Renderer(config)
    try:
        result = renderer.render(task)
    finally:
        renderer.close()
    request = case(model_id, case_id)
    config_q = request["aitk"]["model_config"]
    qtype, _, ara = config_q["qtype"].partition("|")
    assert Quantization.of(task.spec, config.model_source(model_id)).transformer == qtype
    assert bool(task.spec.aitk.ara) == bool(ara) and task.spec.aitk.lora_merged is False
    assert result.record["quantization"]["transformer"] == qtype
    assert result.record["quantization"]["text_encoder"] == ("qfloat8" if config_q["quantize_te"] else None)
    diff = max_level_diff(result.image, expected_png("aitk", model_id, case_id))
    assert diff <= TOLERANCE.get(model_id, 1), f"{model_id}/{case_id}: max diff {diff}/255"


@pytest.mark.parametrize("model_id, case_id, arch, name_or_path", RUN_CASES, ids=lambda v: v)
def test_a_quantised_run_renders_as_ai_toolkit_sampled_it(tmp_path, model_id, case_id, arch, name_or_path):
    torch.set_num_threads(2)
    request = case(model_id, case_id)
    config = daemon_config(tmp_path, request["dtype"])
    checkpoint = write_run(config.inbox, request, arch, name_or_path)
    planned = Planner(config).plan(checkpoint)
    [task] = planned.tasks
    # What ai-toolkit quantised, previewd reproduces: no quantisation gap is left to explain.
    assert not any("quantis" in gap for gap in task.target.parity_gaps)
    render_and_compare(config, planned, model_id, case_id)


@pytest.mark.parametrize("model_id, case_id", REQUEST_CASES, ids=lambda v: v)
def test_a_request_selects_the_same_with_its_aitk_block(tmp_path, model_id, case_id):
    torch.set_num_threads(2)
    request = case(model_id, case_id)
    config = daemon_config(tmp_path, request["dtype"])
    model_config = request["aitk"]["model_config"]
    shutil.copy(GOLDENS / request["lora"]["file"], config.inbox / "lora.safetensors")
    body = {"model": model_id, "parity": "aitk",
            "prompts": [{"prompt": request["prompt"], "neg": request["neg"], "width": request["width"],
                         "height": request["height"], "seed": request["seed"], "sample_steps": request["steps"],
                         "guidance_scale": request["guidance"]}],
            "loras": [{"path": "lora.safetensors", "network_multiplier": request["lora"]["multiplier"]}],
            "aitk": {"vae_tiling": model_config["low_vram"] and model_id != "flux2",
                     **{k: model_config[k] for k in ("quantize", "qtype", "quantize_te", "qtype_te")}}}
    path = config.inbox / "request.yaml"
    path.write_text(yaml.safe_dump(body))
    render_and_compare(config, Planner(config).plan(path), model_id, case_id)

