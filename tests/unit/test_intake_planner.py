"""Intake as planning (previewd.intake.planner): a file in, the tasks it implies out, nothing written."""

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from previewd.config import load_config
from previewd.errors import IntakeError, NotReady
from previewd.instance import EXAMPLE_RUN, render_config
from previewd.intake.planner import Planner


@pytest.fixture
def config(tmp_path):
    (tmp_path / "config.yaml").write_text(render_config(tiny_models_dir="./models"))
    config = load_config(tmp_path / "config.yaml")
    config.inbox.mkdir()
    return config


def _checkpoint(path: Path, step: int = 250) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((4, 16), np.float32),
               "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((16, 4), np.float32)},
              str(path), metadata={"format": "pt", "training_info": f'{{"step": {step}}}'})
    return path


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_planning_a_run_checkpoint_and_a_request_writes_nothing(config, tmp_path):
    run = config.inbox / "example_lora"
    run.mkdir()
    (run / "config.yaml").write_text(EXAMPLE_RUN.format(training_folder=config.inbox))
    checkpoint = _checkpoint(run / "example_lora_000000250.safetensors")
    request = config.inbox / "req.yaml"
    request.write_text("model: qwen_image_edit\nprompts:\n  - prompt: hi\n"
                       f"    ctrl_img: {_png_base64()}\n"
                       "loras:\n  - path: example_lora/example_lora_000000250.safetensors\n")
    before = _tree(tmp_path)
    planner = Planner(config)
    from_checkpoint = planner.plan(checkpoint)
    from_run = planner.plan(run / "config.yaml")
    from_request = planner.plan(request)
    assert _tree(tmp_path) == before
    assert [t.target.image_name for t in from_checkpoint.tasks] == ["000000250_00.png", "000000250_01.png"]
    assert [t.target.image_name for t in from_run.tasks] == ["000000250_00.png", "000000250_01.png"]
    # The LoRA still names the trainer's file: snapshotting it is the dispatcher's job.
    assert {t.spec.lora.path for t in from_checkpoint.tasks} == {str(checkpoint)}
    assert all(t.spec.lora.sha256 is None for t in from_checkpoint.tasks)
    [task] = from_request.tasks
    assert task.target.checkpoint == checkpoint.name and task.target.step == 250
    [(asset, data)] = from_request.assets.items()
    assert task.spec.control("ctrl_img").path == str(asset) and asset.parent == config.asset_dir
    assert not asset.exists() and Image.open(io.BytesIO(data)).size == (16, 16)
    assert from_request.accepted == [request] and from_checkpoint.accepted == [checkpoint]


def test_a_checkpoint_still_being_written_is_not_ready(config):
    run = config.inbox / "example_lora"
    run.mkdir()
    (run / "config.yaml").write_text(EXAMPLE_RUN.format(training_folder=config.inbox))
    checkpoint = _checkpoint(run / "example_lora_000000500.safetensors")
    with open(checkpoint, "r+b") as handle:
        handle.truncate(os.path.getsize(checkpoint) - 8)
    plan = Planner(config).plan(checkpoint)
    assert not plan.ready and plan.tasks == [] and "waiting" in plan.notes[0]


def test_problems_are_reported_in_the_plan_not_raised(config):
    bad = config.inbox / "bad.yaml"
    bad.write_text("model: qwen_image_2512\nprompts: []\n")
    plan = Planner(config).plan(bad)
    [error] = plan.rejected
    assert isinstance(error, IntakeError) and error.path == str(bad) and "prompts" in str(error)
    assert plan.ready and plan.tasks == [] and plan.accepted == []


def test_the_command_line_planner_raises_and_may_read_any_local_file(config, tmp_path):
    elsewhere = _checkpoint(tmp_path / "elsewhere" / "mine.safetensors", step=750)
    request = tmp_path / "req.json"
    request.write_text(f'{{"model": "qwen_image_2512", "prompts": [{{"prompt": "a"}}], '
                       f'"loras": [{{"path": "{elsewhere}"}}]}}')
    [task] = Planner(config).plan_request(request, trusted=True, out_dir=tmp_path / "out").tasks
    assert task.target.out_dir == str(tmp_path / "out") and task.target.step == 750
    with open(elsewhere, "r+b") as handle:
        handle.truncate(os.path.getsize(elsewhere) - 8)
    with pytest.raises(NotReady):
        Planner(config).plan_request(request, trusted=True)


def test_a_sweep_request_names_every_cell_and_records_its_axes(config, tmp_path):
    for step in (250, 500, 750):
        _checkpoint(config.inbox / f"run_{step:09d}.safetensors", step=step)
    request = config.inbox / "sweep.yaml"
    request.write_text("model: qwen_image_2512\nprompts:\n  - prompt: a\n"
                       "network_multipliers: [0.5, 1.0, 1.5]\nloras:\n" +
                       "".join(f"  - path: run_{step:09d}.safetensors\n" for step in (250, 500, 750)))
    tasks = Planner(config).plan(request).tasks
    assert len(tasks) == 9 and len({t.target.image_name for t in tasks}) == 9
    assert {(t.target.step, t.target.strength, t.target.seed) for t in tasks} == {
        (step, m, None) for step in (250, 500, 750) for m in (0.5, 1.0, 1.5)}
    assert tasks[1].target.image_name == "000000250_00_m1.png"
    assert all(t.spec.lora.network_multiplier == t.target.strength for t in tasks)


def test_loras_of_different_runs_with_the_same_step_are_named_by_file(config):
    _checkpoint(config.inbox / "alice_000001000.safetensors", step=1000)
    _checkpoint(config.inbox / "bob_000001000.safetensors", step=1000)
    request = config.inbox / "pair.yaml"
    request.write_text("model: qwen_image_2512\nprompts:\n  - prompt: a\n    seeds: [1, 2]\n"
                       "loras:\n  - path: alice_000001000.safetensors\n  - path: bob_000001000.safetensors\n")
    names = [t.target.image_name for t in Planner(config).plan(request).tasks]
    assert names == ["alice_000001000_00_s1.png", "alice_000001000_00_s2.png", "bob_000001000_00_s1.png",
                     "bob_000001000_00_s2.png"]
