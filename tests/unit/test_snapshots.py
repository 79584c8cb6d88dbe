import hashlib
import os
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from previewd.intake.safetensors_header import CorruptSafetensors
from previewd.snapshots import prune, snapshot


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
    assert [p.name for p in (tmp_path / "snaps").iterdir()] == [snap.name]  # no temporary left behind


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
