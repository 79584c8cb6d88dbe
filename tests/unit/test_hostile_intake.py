"""Intake of hostile files, one process: every refusal is visible, nothing outside the roots is read.

The daemon as a whole, as an unprivileged user, against a hundred and more such files, is
tests/acceptance/test_hostile_inputs.py.
"""

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from previewd import database_identity, rejections, safe_files
from previewd.config import load_config
from previewd.dispatch import Dispatcher
from previewd.inbox import InboxWatcher, Outcome
from previewd.instance import EXAMPLE_RUN, render_config
from previewd.queue import JobStore
from previewd.rejections import error_file, logged_rejections
from previewd.status import build_report
from previewd.tasks import RenderTask


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "config.yaml").write_text(render_config(tiny_models_dir="./models"))
    config = load_config(tmp_path / "config.yaml")
    config.inbox.mkdir()
    config.state_dir.mkdir()
    store = JobStore(config.db_url)
    store.create_schema()
    # As the daemon runs: writes confined to its output roots, rejections without a place logged.
    rejections.configure(config.state_dir)
    safe_files.confine_outputs(config.output_roots)
    yield config, store, Dispatcher(config, store)
    rejections.configure(None)
    safe_files.confine_outputs(None)
    store.close()


def _lora(path: Path, *, value: float = 1.0, tensors: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {"diffusion_model.x.lora_A.weight": np.full((4, 16), value, np.float32),
                          "diffusion_model.x.lora_B.weight": np.zeros((16, 4), np.float32)}, str(path))
    return path


def _run(config) -> Path:
    run = config.inbox / "example_lora"
    run.mkdir()
    (run / "config.yaml").write_text(EXAMPLE_RUN.format(training_folder=config.inbox))
    return run


def _request(config, name: str = "req.yaml", body: str = "model: qwen_image_2512\nprompts:\n  - prompt: a\n") -> Path:
    path = config.inbox / name
    path.write_text(body)
    return path


def test_too_many_or_too_long_prompts_are_refused(setup):
    config, store, dispatcher = setup
    many = _request(config, "many.json", json.dumps({"model": "qwen_image_2512",
                                                     "prompts": [{"prompt": f"p{i}"} for i in range(300)]}))
    long = _request(config, "long.yaml", "model: qwen_image_2512\nprompts:\n  - prompt: " + "a" * 10001 + "\n")
    for path in (many, long):
        dispatcher.handle(path)
    assert "300 prompts; at most 256 per file (limits.prompts_per_file)" in error_file(many).read_text()
    assert "prompts.0.prompt: 10001 characters; at most 10000" in error_file(long).read_text()
    run = _run(config)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(
        '          - "[trigger] holding a sign that says hello --seed 7"\n',
        "".join(f'          - "prompt {i}"\n' for i in range(300))))
    dispatcher.handle(run / "config.yaml")
    assert "(limits.prompts_per_file)" in error_file(run / "config.yaml").read_text()
    assert store.list_jobs() == []


def test_an_alias_bomb_is_refused_in_one_short_line(setup):
    config, store, dispatcher = setup
    body = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8))
    bomb = _request(config, "bomb.yaml", body + "model: qwen_image_2512\nprompts: [{prompt: a}]\n")
    dispatcher.handle(bomb)
    text = error_file(bomb).read_text()
    assert "limits.yaml_alias_nodes" in text and len(text) < 1000 and store.list_jobs() == []


def test_a_run_config_at_the_root_of_the_inbox_is_refused_and_requests_still_work(setup):
    config, store, dispatcher = setup
    (config.inbox / "config.yaml").write_text(EXAMPLE_RUN.format(training_folder=config.inbox))
    dispatcher.handle(config.inbox / "config.yaml")
    assert "directly in a watched folder" in error_file(config.inbox / "config.yaml").read_text()
    dispatcher.handle(_request(config))
    assert len(store.list_jobs()) == 1


def test_an_output_folder_that_would_hide_requests_is_refused(setup):
    config, store, dispatcher = setup
    (config.inbox / "team").mkdir()
    here = _request(config, "team/here.yaml", "model: qwen_image_2512\nprompts: [{prompt: a}]\noutput: {dir: .}\n")
    dispatcher.handle(here)
    assert "holds this request" in error_file(here).read_text() and store.list_jobs() == []
    (config.inbox / "other").mkdir()
    (config.inbox / "other" / "waiting.yaml").write_text("model: qwen_image_2512\nprompts: [{prompt: a}]\n")
    there = _request(config, "there.yaml", "model: qwen_image_2512\nprompts: [{prompt: a}]\noutput: {dir: other}\n")
    dispatcher.handle(there)
    assert "holds request files" in error_file(there).read_text() and store.list_jobs() == []


def test_requests_that_share_a_stem_never_share_a_folder(setup):
    config, store, dispatcher = setup
    dispatcher.handle(_request(config, "x.yaml"))
    dispatcher.handle(_request(config, "x.json", '{"model": "qwen_image_2512", "prompts": [{"prompt": "b"}]}'))
    folders = {RenderTask.model_validate(job.payload).target.out_dir for job in store.list_jobs()}
    assert folders == {str(config.outbox_root / "x"), str(config.outbox_root / "x.json")}


def test_a_name_that_is_not_utf8_is_refused_visibly(setup):
    config, store, dispatcher = setup
    path = Path(os.fsdecode(bytes(config.inbox) + b"/caf\xe9.yaml"))
    path.write_text("model: qwen_image_2512\nprompts: [{prompt: a}]\n")
    dispatcher.handle(path)
    text = error_file(path).read_text()
    assert "caf\\xe9.yaml" in text and "not valid UTF-8" in text and store.list_jobs() == []


def test_a_name_too_long_for_an_error_file_goes_to_the_rejected_log_and_status(setup):
    config, store, dispatcher = setup
    path = config.inbox / ("n" * 250 + ".yaml")
    path.write_text("model: nope\n")
    dispatcher.handle(path)
    [entry] = [e for e in logged_rejections(config.state_dir) if "model" in e["reason"]]
    assert entry["path"] == str(path) and "Traceback" not in entry["reason"]
    assert build_report(config, store)["rejected_log"][0]["path"] == str(path)


def test_an_incomplete_checkpoint_waits_then_is_refused(setup):
    config, store, dispatcher = setup
    run = _run(config)
    ckpt = _lora(run / "example_lora_000000250.safetensors")
    ckpt.write_bytes(ckpt.read_bytes()[:-8])
    assert dispatcher.handle(ckpt) is Outcome.STALLED and not error_file(ckpt).exists()
    old = time.time() - 11 * 60
    os.utime(ckpt, (old, old))
    assert dispatcher.handle(ckpt) is Outcome.DONE
    assert "(limits.incomplete_checkpoint_minutes: 10)" in error_file(ckpt).read_text()
    empty = run / "example_lora_000000500.safetensors"
    empty.write_bytes(b"")
    os.utime(empty, (old, old))
    dispatcher.handle(empty)
    assert "incomplete" in error_file(empty).read_text() and store.list_jobs() == []


@pytest.mark.parametrize("tensors,reason", [
    ({"weight": np.ones((2, 2), np.float32)}, "is not a LoRA weight"),
    ({"diffusion_model.x.lora_A.weight": np.ones((4, 16), np.float32)}, "only one of its two LoRA matrices"),
    ({"diffusion_model.x.lora_A.weight": np.ones((4, 16), np.float32),
      "diffusion_model.x.lora_B.weight": np.ones((16, 3), np.float32)}, "incompatible LoRA shapes"),
    ({"diffusion_model.x.lokr_w1": np.ones((2, 2), np.float32)}, "unsupported LoRA variant"),
    ({"diffusion_model.x.lora_A.weight": np.ones((4, 16), np.int32),
      "diffusion_model.x.lora_B.weight": np.ones((16, 4), np.int32)}, "not a floating-point tensor"),
])
def test_a_checkpoint_whose_tensors_cannot_apply_is_refused_at_intake(setup, tensors, reason):
    config, store, dispatcher = setup
    run = _run(config)
    ckpt = _lora(run / "example_lora_000000250.safetensors", tensors=tensors)
    dispatcher.handle(ckpt)
    assert reason in error_file(ckpt).read_text() and store.list_jobs() == []


def _raw_checkpoint(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("header,data,reason", [
    ({"x.lora_A.weight": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}, b"",
     "(limits.checkpoint_gb)"),
    ({"x.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8,
     "do not match its dtype and shape"),
    ({"x.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
     "does not start where the previous one ends"),
    ({"__metadata__": {"pad": "x" * (2 << 20)}, "x.lora_A.weight": {"dtype": "F32", "shape": [1],
                                                                   "data_offsets": [0, 4]}}, b"\0" * 4,
     "a header of 2.0 MiB for 0.0 MiB of tensors"),
])
def test_impossible_claims_are_refused_at_once(setup, header, data, reason):
    config, store, dispatcher = setup
    run = _run(config)
    ckpt = _raw_checkpoint(run / "example_lora_000000250.safetensors", header, data)
    dispatcher.handle(ckpt)
    assert reason in error_file(ckpt).read_text() and store.list_jobs() == []


def test_a_sparse_checkpoint_is_refused_and_never_copied(setup):
    config, store, dispatcher = setup
    run = _run(config)
    size = 64 << 20
    header = {"diffusion_model.x.lora_A.weight": {"dtype": "F32", "shape": [size // 8], "data_offsets": [0, size // 2]},
              "diffusion_model.x.lora_B.weight": {"dtype": "F32", "shape": [size // 8, 1],
                                                  "data_offsets": [size // 2, size]}}
    ckpt = _raw_checkpoint(run / "example_lora_000000250.safetensors", header, b"")
    with open(ckpt, "r+b") as handle:
        handle.truncate(ckpt.stat().st_size + size)  # a hole: the header's claim, holding nothing
    dispatcher.handle(ckpt)
    assert "a sparse file" in error_file(ckpt).read_text() and store.list_jobs() == []
    assert not config.snapshot_dir.exists() or not any(config.snapshot_dir.glob("*.safetensors"))


def test_non_finite_weights_are_refused_beside_the_checkpoint_and_the_request(setup):
    config, store, dispatcher = setup
    ckpt = _lora(config.inbox / "nan.safetensors", value=float("nan"))
    request = _request(config, "req.yaml", "model: qwen_image_2512\nprompts: [{prompt: a}]\n"
                                           "loras: [{path: nan.safetensors}]\n")
    dispatcher.handle(request)
    assert "NaN or infinite" in error_file(ckpt).read_text()
    assert "loras: nan.safetensors: " in error_file(request).read_text() and store.list_jobs() == []


def test_values_that_can_never_render_are_refused_at_intake(setup):
    config, store, dispatcher = setup
    request = _request(config, "req.yaml", "model: qwen_image_2512\nprompts:\n  - prompt: a\n    sample_steps: 1\n"
                                           "  - prompt: b\n    seed: 18446744073709551616\n")
    dispatcher.handle(request)
    text = error_file(request).read_text()
    assert "prompts.0.sample_steps: 1 cannot render" in text and "prompts.1.seed: " in text


def test_a_fifo_a_device_link_and_a_link_out_are_refused_beside_them(setup, tmp_path):
    config, store, dispatcher = setup
    secret = tmp_path / "secret.yaml"
    secret.write_text("model: qwen_image_2512\nprompts: [{prompt: TOP-SECRET}]\n")
    os.mkfifo(config.inbox / "fifo.yaml")
    (config.inbox / "zero.yaml").symlink_to("/dev/zero")
    (config.inbox / "out.yaml").symlink_to(secret)
    for name, reason in (("fifo.yaml", "a FIFO"), ("zero.yaml", "leads out of"), ("out.yaml", "leads out of")):
        started = time.monotonic()
        assert dispatcher.handle(config.inbox / name) is Outcome.DONE
        assert time.monotonic() - started < 2
        text = error_file(config.inbox / name).read_text()
        assert reason in text and "TOP-SECRET" not in text
    assert not (config.inbox / "out.yaml").is_symlink() or (config.inbox / "out.yaml").resolve() == secret
    assert store.list_jobs() == []


def test_the_watcher_is_idle_once_only_stalled_files_remain(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a").write_text("x")
    outcomes = {"a": Outcome.STALLED}
    watcher = InboxWatcher([tmp_path / "in"], lambda p: outcomes[p.name], ignore=lambda p: False,
                           settle_seconds=0.05, polling=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 5
        while not (watcher.idle and watcher.stalled()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.idle and watcher.stalled() == [tmp_path / "in" / "a"]
        outcomes["b"] = Outcome.RETRY
        (tmp_path / "in" / "b").write_text("y")
        watcher.touch(tmp_path / "in" / "b")
        assert not watcher.idle
    finally:
        watcher.stop()


def test_the_watcher_delivers_links_to_folders_and_never_walks_them(tmp_path):
    (tmp_path / "in" / "run" / "previews").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.yaml").write_text("x")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "outside")
    delivered = []
    watcher = InboxWatcher([tmp_path / "in"], lambda p: delivered.append(p) or Outcome.DONE, ignore=lambda p: False,
                           settle_seconds=0.05)
    watcher.start()
    try:
        # A watched folder moved away and a link put in its place: scanned where it went, not through the link.
        os.rename(tmp_path / "in" / "run" / "previews", tmp_path / "in" / "run" / "previews.old")
        (tmp_path / "in" / "run" / "previews").symlink_to(tmp_path / "outside")
        deadline = time.monotonic() + 5
        while len(delivered) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.stop()
    assert set(delivered) == {tmp_path / "in" / "linked", tmp_path / "in" / "run" / "previews"}


def test_a_deleted_or_replaced_database_is_noticed(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with JobStore(url) as store:
        store.upgrade_schema()
    identity = database_identity.check_after_connect(url, tmp_path)
    assert database_identity.still_there(url, identity) is None
    (tmp_path / "q.db").unlink()
    assert "deleted" in database_identity.still_there(url, identity)
    with pytest.raises(database_identity.DatabaseReplaced, match="missing"):
        database_identity.check_before_connect(url, tmp_path)
    with JobStore(url) as store:  # e.g. `previewd status` created an empty one meanwhile
        store.upgrade_schema()
    with pytest.raises(database_identity.DatabaseReplaced, match="db upgrade"):
        database_identity.check_after_connect(url, tmp_path)
    database_identity.check_after_connect(url, tmp_path, adopt=True)  # what `previewd db upgrade` does
    database_identity.check_after_connect(url, tmp_path)
