"""ai-toolkit's three example configs (../shared/aitk-examples/) render end to end through a real
`previewd run`, on tiny models standing in for the real ones, with exactly the sample parameters
ai-toolkit would use.

Each run is written where and how ai-toolkit writes it: `training_folder/<name>/config.yaml`, the
job config with `[name]` replaced, `yaml.dump`ed in ai-toolkit's key order, plus one LoRA checkpoint
in ai-toolkit's saved format. The user-side edits are the ones anyone previewing on a CPU makes in
the config: the example's placeholder control images point at real files, and the sample size and
step count are made tiny.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.numpy import save_file

from previewd.instance import render_config

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "aitk-examples"
CASES = {  # example -> (model id, control slots of every sample)
    "train_lora_qwen_image_24gb.yaml": ("qwen_image", []),
    "train_lora_qwen_image_edit_32gb.yaml": ("qwen_image_edit", ["ctrl_img"]),
    "train_lora_qwen_image_edit_2509_32gb.yaml": ("qwen_image_edit_plus", ["ctrl_img_1", "ctrl_img_2"]),
}
SIZE, STEPS = 64, 2
STEP = 250


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ids = [arg for mid, _ in CASES.values() for arg in ("--model", mid)]
    subprocess.run([sys.executable, "-m", "previewd", "tiny-models", str(root), *ids], check=True,
                   capture_output=True, timeout=600)
    return root


def transformer_header(model_dir: Path) -> dict:
    weights = model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(weights, "rb") as handle:
        return json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))


def write_lora(model_dir: Path, path: Path, *, job_name: str, step: int) -> None:
    """A rank-4 LoRA on the attention projections, keyed and headed as ai-toolkit saves it."""
    weights = model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    header = transformer_header(model_dir)
    rng = np.random.default_rng(step)
    tensors = {}
    for key, info in sorted(header.items()):
        if key.endswith((".attn.to_q.weight", ".attn.to_k.weight", ".attn.to_v.weight")):
            out_features, in_features = info["shape"]
            stem = "diffusion_model." + key.removesuffix(".weight")
            tensors[f"{stem}.lora_A.weight"] = rng.normal(0, 0.5, (4, in_features)).astype(np.float16)
            tensors[f"{stem}.lora_B.weight"] = rng.normal(0, 0.5, (out_features, 4)).astype(np.float16)
    assert tensors, f"no attention projections in {weights}"
    save_file(tensors, str(path), metadata={"training_info": json.dumps({"step": step, "epoch": 0}),
                                            "ss_output_name": job_name, "format": "pt"})


def ara_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """A rank-8 accuracy recovery adapter over every Linear layer of the tiny transformer, in the format
    ai-toolkit reads (`diffusion_model.<module>.lora_A/B.weight`, bf16 saved as float16 here)."""
    rng = np.random.default_rng(7)
    tensors = {}
    for key, info in sorted(transformer_header(model_dir).items()):
        if key.endswith(".weight") and len(info["shape"]) == 2:
            out_features, in_features = info["shape"]
            stem = "diffusion_model." + key.removesuffix(".weight")
            tensors[f"{stem}.lora_A.weight"] = rng.normal(0, 0.05, (8, in_features)).astype(np.float16)
            tensors[f"{stem}.lora_B.weight"] = rng.normal(0, 0.05, (out_features, 8)).astype(np.float16)
    return tensors


def place_adapter(example: str, run: Path, cache: Path, models: Path) -> None:
    """The example's `qtype: uint3|<adapter>` where ai-toolkit left it: a hub path in the Hugging Face
    cache, a bare file name in the run's working directory (previewd looks in the run folder first)."""
    raw = yaml.safe_load((EXAMPLES / example).read_text())
    adapter = raw["config"]["process"][0]["model"]["qtype"].partition("|")[2]
    tensors = ara_tensors(models / CASES[example][0])
    parts = adapter.split("/")
    if len(parts) == 1:
        save_file(tensors, str(run / adapter))
        return
    repo = cache / f"models--{parts[0]}--{parts[1]}"
    (repo / "snapshots" / "c0ffee").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("c0ffee")
    save_file(tensors, str(repo / "snapshots" / "c0ffee" / parts[2]))


def write_run(example: str, inbox: Path, controls: Path, models: Path) -> tuple[Path, dict]:
    text = (EXAMPLES / example).read_text()
    for placeholder, color in (("/path/to/image1.png", "red"), ("/path/to/image2.png", "blue"),
                               ("/path/to/control/image.jpg", "green")):
        picture = controls / placeholder.removeprefix("/path/to/")
        picture.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 32), color).save(picture)
        text = text.replace(placeholder, str(picture))
    raw = yaml.safe_load(text)
    name = raw["config"]["name"]
    raw = json.loads(json.dumps(raw).replace("[name]", name))  # as toolkit/config.py preprocesses it
    process = raw["config"]["process"][0]
    process["training_folder"] = str(inbox)
    process["sample"].update(width=SIZE, height=SIZE, sample_steps=STEPS)
    run = inbox / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    write_lora(models / CASES[example][0], run / f"{name}_{STEP:09d}.safetensors", job_name=name, step=STEP)
    return run, process["sample"]


def test_example_configs_render_as_ai_toolkit_samples_them(tmp_path: Path, tiny_models: Path) -> None:
    controls, inbox = tmp_path / "controls", tmp_path / "inbox"
    runs = {example: write_run(example, inbox, controls, tiny_models) for example in CASES}
    cache = tmp_path / "hf"
    for example, (run, _sample) in runs.items():
        place_adapter(example, run, cache, tiny_models)
    config = tmp_path / "config.yaml"
    config.write_text(render_config(tiny_models_dir=str(tiny_models), settle_seconds=0.5, idle_poll_seconds=0.2)
                      .replace("allowed_roots: []", f"allowed_roots: [{controls}]"))
    done = subprocess.run([sys.executable, "-m", "previewd", "run", "-c", str(config), "--exit-when-idle"],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr[-4000:]

    for example, (run, sample) in runs.items():
        model, slots = CASES[example]
        assert not list(run.glob("*.error.txt")), (run / "config.yaml.error.txt").read_text()
        manifest = json.loads((run / "previews" / "manifest.json").read_text())
        renders = sorted(manifest["renders"], key=lambda r: r["prompt_index"])
        prompts = sample.get("prompts") or [item["prompt"] for item in sample["samples"]]
        assert [r["prompt_index"] for r in renders] == list(range(len(prompts)))
        for i, render in enumerate(renders):
            # walk_seed from 42; neg ""; guidance 3; the LoRA at 1.0; the size and steps as configured
            assert (render["model"], render["step"], render["prompt"], render["neg"], render["seed"]) == \
                (model, STEP, prompts[i], "", 42 + i)
            assert (render["width"], render["height"], render["sample_steps"], render["guidance_scale"]) == \
                (SIZE, SIZE, STEPS, 3.0)
            assert render["network_multiplier"] == 1.0 and render["parity"] == "aitk"
            assert [c["slot"] for c in render["control_images"]] == slots
            assert (run / "previews" / render["image"]).is_file()
            quantization = render["record"]["quantization"]
            assert (quantization["transformer"], quantization["text_encoder"]) == ("uint3", "qfloat8")
            assert quantization["ara_layers"] > 0 and render["record"]["lora"]["mode"] == "branch"
        # The examples train quantised (uint3 with an accuracy recovery adapter, a qfloat8 text encoder):
        # previewd reproduces that, so it is no parity gap.
        assert not any("quantis" in gap for gap in manifest["parity_gaps"])
