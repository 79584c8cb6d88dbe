import hashlib
import os
import time

from previewd.snapshots import prune, snapshot


def test_snapshot_survives_the_trainer_deleting_the_checkpoint(tmp_path):
    source = tmp_path / "run" / "lora_000000250.safetensors"
    source.parent.mkdir()
    source.write_bytes(b"weights" * 1000)
    snap, digest = snapshot(source, tmp_path / "snaps")
    assert digest == hashlib.sha256(b"weights" * 1000).hexdigest()
    assert snap.name == f"{digest}.safetensors"
    os.unlink(source)  # ai-toolkit's clean_up_saves
    assert snap.read_bytes() == b"weights" * 1000
    again, same = snapshot(snap, tmp_path / "snaps")
    assert (again, same) == (snap, digest)
    assert [p.name for p in (tmp_path / "snaps").iterdir()] == [snap.name]  # no temporary left behind


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
    source.write_bytes(b"first run")
    snap, digest = snapshot(source, tmp_path / "snaps")
    with open(source, "r+b") as handle:  # what safetensors does when a resumed run saves the same name
        handle.truncate(0)
        handle.write(b"resumed run")
    assert hashlib.sha256(snap.read_bytes()).hexdigest() == digest
