import hashlib
import os
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from previewd.intake.safetensors_header import CorruptSafetensors
from previewd.snapshots import prune, recall, snapshot


def _lora(path, value=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"m.lora_A.weight": np.full((4, 16), value, np.float32), "m.lora_B.weight": np.zeros((16, 4), np.float32)},
              str(path))
    return path.read_bytes()


def test_snapshot_survives_the_trainer_deleting_the_checkpoint(tmp_path):
    source = tmp_path / "run" / "lora_000000250.safetensors"
    data = _lora(source)
    snap, digest = snapshot(source, tmp_path / "snaps")
    assert digest == hashlib.sha256(data).hexdigest()
    assert snap.name == f"{digest}.safetensors"
    os.unlink(source)  # ai-toolkit's clean_up_saves
    assert snap.read_bytes() == data
    again, same = snapshot(snap, tmp_path / "snaps")
    assert (again, same) == (snap, digest)
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == [".sources", snap.name]  # no temporary left


def test_an_unchanged_checkpoint_is_recalled_without_reading_it_and_a_rewritten_one_is_not(tmp_path):
    source = tmp_path / "run" / "lora_000000250.safetensors"
    _lora(source)
    assert recall(source, tmp_path / "snaps") is None
    snap, digest = snapshot(source, tmp_path / "snaps")
    os.utime(snap, (1, 1))
    assert recall(source, tmp_path / "snaps") == (snap, digest)
    # Needed again, so touched (the pruner reads the ctime a touch sets; the mtime shows it happened).
    assert time.time() - snap.stat().st_mtime < 60
    snap.unlink()  # pruned once its jobs were done: the hash is still known
    assert recall(source, tmp_path / "snaps") == (snap, digest)
    time.sleep(0.05)  # past the kernel's coarse clock tick, so that the ctime can change
    os.chmod(source, 0o644)  # a change of the inode's metadata (ctime): no longer known
    assert recall(source, tmp_path / "snaps") is None
    snapshot(source, tmp_path / "snaps")
    assert recall(source, tmp_path / "snaps") is not None
    before = os.stat(source)
    time.sleep(0.05)
    with open(source, "r+b") as handle:  # rewritten in place (a resumed run), its old mtime restored
        handle.seek(-4, os.SEEK_END)
        handle.write(np.float32(2.0).tobytes())
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(source).st_mtime_ns == before.st_mtime_ns
    assert recall(source, tmp_path / "snaps") is None


def test_memos_of_long_gone_checkpoints_are_pruned(tmp_path):
    source = tmp_path / "lora_000000250.safetensors"
    _lora(source)
    snapshot(source, tmp_path / "snaps")
    [memo] = (tmp_path / "snaps" / ".sources").iterdir()
    prune(tmp_path / "snaps", set(), min_age_seconds=0, now=time.time() + 89 * 86400)
    assert memo.exists()
    prune(tmp_path / "snaps", set(), min_age_seconds=0, now=time.time() + 91 * 86400)
    assert not memo.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_not_kept(tmp_path, value):
    source = tmp_path / "lora_000000250.safetensors"
    _lora(source, value)
    with pytest.raises(CorruptSafetensors, match="NaN or infinite"):
        snapshot(source, tmp_path / "snaps")
    assert list((tmp_path / "snaps").iterdir()) == []


def test_an_incomplete_checkpoint_is_not_kept(tmp_path):
    source = tmp_path / "lora_000000250.safetensors"
    source.write_bytes(_lora(source)[:-4])
    with pytest.raises(CorruptSafetensors):
        snapshot(source, tmp_path / "snaps")


def test_prune_keeps_needed_and_young_snapshots(tmp_path):
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    for name in ("aaa", "bbb", "ccc"):
        (snaps / f"{name}.safetensors").write_bytes(b"x")
    now = time.time()
    assert prune(snaps, {"aaa"}, min_age_seconds=60, now=now) == []  # all young
    removed = prune(snaps, {"aaa"}, min_age_seconds=60, now=now + 120)
    assert sorted(p.name for p in removed) == ["bbb.safetensors", "ccc.safetensors"]
    assert [p.name for p in snaps.iterdir()] == ["aaa.safetensors"]


def test_snapshot_is_unaffected_by_the_trainer_rewriting_the_file_in_place(tmp_path):
    source = tmp_path / "lora_000000250.safetensors"
    _lora(source)
    snap, digest = snapshot(source, tmp_path / "snaps")
    resumed = _lora(tmp_path / "other.safetensors", 2.0)
    with open(source, "r+b") as handle:  # what safetensors does when a resumed run saves the same name
        handle.truncate(0)
        handle.write(resumed)
    assert hashlib.sha256(snap.read_bytes()).hexdigest() == digest
