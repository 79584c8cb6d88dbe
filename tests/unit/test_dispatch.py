from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from previewd import snapshots
from previewd.config import load_config
from previewd.dispatch import Dispatcher
from previewd.inbox import Outcome
from previewd.intake.planner import Planner
from previewd.rejections import error_file, rejected_inputs
from previewd.instance import EXAMPLE_RUN, render_config
from previewd.queue import JobStore
from previewd.tasks import RenderTask


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "config.yaml").write_text(render_config(tiny_models_dir="./models"))
    config = load_config(tmp_path / "config.yaml")
    config.inbox.mkdir()
    config.state_dir.mkdir()
    store = JobStore(config.db_url)
    store.create_schema()
    yield config, store, Dispatcher(config, store)
    store.close()


def _checkpoint(path: Path, step: int | None = None, value: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"} | ({"training_info": f'{{"step": {step}, "epoch": 0}}'} if step else {})
    save_file({"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": np.full((4, 16), value, np.float32),
               "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((16, 4), np.float32)},
              str(path), metadata=meta)
    return path


def _run(config) -> Path:
    run = config.inbox / "example_lora"
    run.mkdir()
    (run / "config.yaml").write_text(EXAMPLE_RUN.format(training_folder=config.inbox))
    return run


def test_checkpoint_of_a_run_queues_one_job_per_sample_prompt(setup):
    config, store, dispatcher = setup
    run = _run(config)
    ckpt = _checkpoint(run / "example_lora_000000250.safetensors")
    assert dispatcher.handle(ckpt) is Outcome.DONE
    jobs = store.list_jobs()
    tasks = [RenderTask.model_validate(j.payload) for j in jobs]
    assert [(t.target.step, t.target.prompt_index) for t in tasks] == [(250, 0), (250, 1)]
    assert {t.target.out_dir for t in tasks} == {str(run / "previews")}
    assert tasks[0].spec.prompt == "p3r5on a red fox sitting in fresh snow, golden hour"
    assert tasks[1].spec.seed == 7 and tasks[0].spec.seed == 42
    snap = Path(tasks[0].spec.lora.path)
    assert snap.parent == config.snapshot_dir and snap.stem == tasks[0].spec.lora.sha256
    assert jobs[0].affinity == f"{tasks[0].spec.lora.sha256}:1.0"
    # The same file again (rescan, restart, the run's config.yaml re-read): nothing new.
    dispatcher.handle(ckpt)
    dispatcher.handle(run / "config.yaml")
    assert len(store.list_jobs()) == 2


def test_a_restart_does_not_copy_checkpoints_whose_jobs_are_known_but_a_new_prompt_does(setup, monkeypatch):
    config, store, dispatcher = setup
    run = _run(config)
    ckpt = _checkpoint(run / "example_lora_000000250.safetensors")
    dispatcher.handle(ckpt)
    [snap] = {Path(RenderTask.model_validate(j.payload).spec.lora.path) for j in store.list_jobs()}
    snap.unlink()  # its jobs done, the snapshot pruned
    copies = []
    real_snapshot = snapshots.snapshot
    monkeypatch.setattr(snapshots, "snapshot", lambda *a, **k: copies.append(a[0]) or real_snapshot(*a, **k))
    restarted = Dispatcher(config, store)
    assert restarted.handle(ckpt) is Outcome.DONE and restarted.handle(run / "config.yaml") is Outcome.DONE
    assert copies == [] and not snap.exists() and len(store.list_jobs()) == 2
    # A prompt added to the run: its job needs the copy, which is made again (the same content).
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace('--seed 7"\n', '--seed 7"\n          - "a third one"\n'))
    assert restarted.handle(run / "config.yaml") is Outcome.DONE
    assert copies == [ckpt] and snap.is_file() and len(store.list_jobs()) == 3


def test_a_lora_that_failed_to_apply_is_said_beside_its_checkpoint_after_a_restart_too(setup):
    config, store, dispatcher = setup
    run = _run(config)
    ckpt = _checkpoint(run / "example_lora_000000250.safetensors")
    dispatcher.handle(ckpt)
    for _ in store.list_jobs():
        job = store.claim("w1", lease_seconds=60)
        store.fail(job.id, "w1", "LoraError: none of the 1 LoRA modules exists in this model", retry_in=None)
    Dispatcher(config, store).handle(ckpt)  # the restart delivers it again: still accepted as a file
    said = error_file(ckpt).read_text()
    assert "rendering with it failed: none of the 1 LoRA modules exists in this model" in said
    assert "LoraError" not in said


def test_final_checkpoint_takes_its_step_from_the_header(setup):
    config, store, dispatcher = setup
    run = _run(config)
    dispatcher.handle(_checkpoint(run / "example_lora.safetensors", step=1000))
    assert {RenderTask.model_validate(j.payload).target.image_name for j in store.list_jobs()} == \
        {"000001000_00.png", "000001000_01.png"}


def test_incomplete_checkpoint_is_not_taken_yet(setup):
    config, store, dispatcher = setup
    run = _run(config)
    ckpt = _checkpoint(run / "example_lora_000000500.safetensors")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-10])
    # Only time changes an incomplete checkpoint: delivered again, but it keeps no one waiting.
    assert dispatcher.handle(ckpt) is Outcome.STALLED
    assert store.list_jobs() == []
    ckpt.write_bytes(data)
    assert dispatcher.handle(ckpt) is Outcome.DONE and len(store.list_jobs()) == 2


def test_run_files_that_are_not_checkpoints_are_left_alone(setup):
    config, store, dispatcher = setup
    run = _run(config)
    (run / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    _checkpoint(run / "other_name_000000250.safetensors")
    assert dispatcher.handle(run / "optimizer.pt") and dispatcher.handle(run / "other_name_000000250.safetensors")
    assert store.list_jobs() == [] and not error_file(run / "optimizer.pt").exists()


def test_loose_pickled_weights_are_refused_without_opening(setup):
    config, _store, dispatcher = setup
    path = config.inbox / "model.ckpt"
    path.write_bytes(b"not even read")
    dispatcher.handle(path)
    assert "pickled weights are never loaded" in error_file(path).read_text()


def test_bad_request_gets_an_error_file_until_it_is_fixed(setup):
    config, store, dispatcher = setup
    run = _run(config)
    _checkpoint(run / "example_lora_000000250.safetensors")
    request = config.inbox / "req.yaml"
    request.write_text("model: qwen_image_2512\nprompts:\n  - prompt: hi\n    sample_step: 3\n")
    dispatcher.handle(request)
    text = error_file(request).read_text()
    assert "prompts.0.sample_step" in text and "sample_steps" in text
    [(path, reason)] = rejected_inputs([config.inbox])
    assert path == request and "prompts.0.sample_step" in reason
    request.write_text("model: qwen_image_2512\nprompts:\n  - prompt: hi\n    sample_steps: 3\n"
                       "loras:\n  - path: example_lora/example_lora_000000250.safetensors\n")
    dispatcher.handle(request)
    assert not error_file(request).exists() and rejected_inputs([config.inbox]) == []
    [job] = store.list_jobs()
    task = RenderTask.model_validate(job.payload)
    assert task.target.out_dir == str(config.outbox_root / "req") and task.target.step is None
    assert task.spec.lora.sha256 and Path(task.spec.lora.path).parent == config.snapshot_dir


def test_request_paths_are_confined_to_the_roots(setup, tmp_path):
    config, store, dispatcher = setup
    outside = _checkpoint(tmp_path / "elsewhere" / "x.safetensors")
    request = config.inbox / "req.json"
    request.write_text(f'{{"model": "qwen_image_2512", "prompts": [{{"prompt": "a"}}], '
                       f'"loras": [{{"path": "{outside}"}}]}}')
    dispatcher.handle(request)
    assert "loras.0.path" in error_file(request).read_text()
    assert store.list_jobs() == []
    # The user's own command (`previewd render`) may name any local file.
    [task] = Planner(config).plan_request(request, trusted=True).tasks
    assert task.spec.lora is not None and task.spec.lora.path == str(outside)


def test_ignore_skips_own_outputs_samples_and_temporaries(setup):
    config, _store, dispatcher = setup
    run = _run(config)
    results = config.inbox / "results"  # a request's output.dir inside the inbox
    (results).mkdir()
    (results / ".manifest.lock").touch()
    for path, ignored in [(results / "manifest.json", True), (results, True),
                          (run / "samples" / "1__000000250_0.jpg", True), (run / "samples", True),
                          (config.inbox / "samples" / "req.yaml", False),
                          (config.inbox / ".x.yaml", True), (config.inbox / "a.yaml.error.txt", True),
                          (config.inbox / "up.tmp", True), (config.state_dir / "assets" / "a.png", True),
                          (config.inbox / "a.yaml", False), (run / "run_000000250.safetensors", False)]:
        assert dispatcher.ignore(path) is ignored, path


def test_known_parity_gaps_of_a_run_travel_with_its_jobs(setup):
    config, store, dispatcher = setup
    run = _run(config)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("quantize: false", "quantize: true"))
    dispatcher.handle(_checkpoint(run / "example_lora_000000250.safetensors"))
    task = RenderTask.model_validate(store.list_jobs()[0].payload)
    # previewd reproduces the qfloat8 quantisation, so that is no gap; the bf16 checkpoints are.
    assert (task.spec.aitk.quantize, task.spec.aitk.qtype, task.spec.aitk.lora_merged) == (True, "qfloat8", False)
    assert not any("quantis" in gap for gap in task.target.parity_gaps)
    assert any("saved in bf16" in gap for gap in task.target.parity_gaps)


def test_baseline_renders_the_base_model_once_per_run(tmp_path):
    (tmp_path / "config.yaml").write_text(render_config().replace("baseline: false", "baseline: true"))
    config = load_config(tmp_path / "config.yaml")
    config.inbox.mkdir()
    config.state_dir.mkdir()
    with JobStore(config.db_url) as store:
        store.create_schema()
        dispatcher = Dispatcher(config, store)
        run = _run(config)
        dispatcher.handle(run / "config.yaml")
        dispatcher.handle(run / "config.yaml")
        tasks = [RenderTask.model_validate(j.payload) for j in store.list_jobs()]
    assert [(t.target.image_name, t.target.step, t.target.checkpoint, t.spec.lora) for t in tasks] == [
        ("base_00.png", 0, None, None), ("base_01.png", 0, None, None)]


def test_error_files_replace_planted_symlinks_instead_of_following_them(setup, tmp_path):
    config, _store, dispatcher = setup
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    bad = config.inbox / "bad.yaml"
    bad.write_text("model: nope\n")
    error_file(bad).symlink_to(victim)
    dispatcher.handle(bad)
    assert victim.read_text() == "precious"
    assert not error_file(bad).is_symlink() and "model" in error_file(bad).read_text()


def test_a_corrupt_checkpoint_gets_an_error_file_and_does_not_block_the_others(setup):
    config, store, dispatcher = setup
    run = _run(config)
    (run / "example_lora_000000250.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    _checkpoint(run / "example_lora_000000500.safetensors")
    dispatcher.handle(run / "config.yaml")
    assert "example_lora_000000250" in error_file(run / "example_lora_000000250.safetensors").read_text()
    assert {RenderTask.model_validate(j.payload).target.step for j in store.list_jobs()} == {500}


def test_only_ai_toolkit_configs_make_a_folder_a_run(setup):
    config, store, dispatcher = setup
    (config.inbox / "team").mkdir()
    (config.inbox / "team" / "config.yaml").write_text("something: else\n")  # not an ai-toolkit job
    request = config.inbox / "team" / "req.yaml"
    request.write_text("model: qwen_image_2512\nprompts: [{prompt: x}]\n")
    dispatcher.handle(request)
    assert len(store.list_jobs()) == 1


def test_requests_with_the_same_name_in_different_folders_do_not_collide(setup):
    config, store, dispatcher = setup
    for team in ("alice", "bob"):
        (config.inbox / team).mkdir()
        (config.inbox / team / "req.yaml").write_text("model: qwen_image_2512\nprompts: [{prompt: x}]\n")
        dispatcher.handle(config.inbox / team / "req.yaml")
    assert sorted(RenderTask.model_validate(j.payload).target.out_dir for j in store.list_jobs()) == [
        str(config.outbox_root / "alice" / "req"), str(config.outbox_root / "bob" / "req")]


def test_request_output_dir_may_not_be_a_watched_folder_or_a_run(setup):
    config, store, dispatcher = setup
    run = _run(config)
    for target in (run, config.inbox):
        request = config.inbox / "r.yaml"
        request.write_text(f"model: qwen_image_2512\nprompts: [{{prompt: x}}]\noutput: {{dir: '{target}'}}\n")
        dispatcher.handle(request)
        assert "output.dir" in error_file(request).read_text()
    assert store.list_jobs() == []


def test_a_symlinked_previews_folder_is_refused(setup, tmp_path):
    config, store, dispatcher = setup
    run = _run(config)
    (tmp_path / "elsewhere").mkdir()
    (run / "previews").symlink_to(tmp_path / "elsewhere")
    dispatcher.handle(_checkpoint(run / "example_lora_000000250.safetensors"))
    assert "symbolic link" in error_file(run / "config.yaml").read_text()
    assert store.list_jobs() == []


def test_a_symlink_loop_is_delivered_and_refused_visibly(setup):
    config, store, dispatcher = setup
    loop = config.inbox / "loop.yaml"
    loop.symlink_to(loop)
    assert dispatcher.ignore(loop) is False
    assert dispatcher.handle(loop) is Outcome.DONE
    assert "symbolic link" in error_file(loop).read_text() and store.list_jobs() == []
