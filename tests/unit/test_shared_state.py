"""What several workers must share: probes of the state folder, a job's files, the file clock."""

import time
from datetime import datetime, timezone

from previewd import shared_state
from previewd.queue import Worker
from previewd.spec import ControlImage, LoraSpec, RenderSpec
from previewd.tasks import OutputTarget, RenderTask


def _worker(worker_id: str, probe: str | None, *, gone: bool = False) -> Worker:
    now = datetime.now(timezone.utc)
    return Worker(id=worker_id, hostname=f"host-{worker_id}", pid=1, started_at=now, last_heartbeat=now,
                  current_job_id=None, device="cuda:0", model=None, gone_at=now if gone else None, probe=probe)


def test_peers_whose_probes_this_host_reads_are_fine(tmp_path):
    shared = tmp_path / "state" / "checkpoints"
    probes = {w: str(shared_state.write_probe(shared, w)) for w in ("a:1:x", "b:2:y")}
    assert all(p.startswith(str(shared / ".probe-")) for p in probes.values())
    workers = [_worker(w, p) for w, p in probes.items()]
    assert shared_state.check_peers(workers, "a:1:x") == []
    assert shared_state.check_peers(workers) == []  # doctor: not a worker itself


def test_a_probe_missing_or_written_by_someone_else_says_the_folder_is_not_shared(tmp_path):
    here = tmp_path / "state"
    other_folder_same_path = str(shared_state.write_probe(here, "c:3:z"))
    (here / ".probe-c:3:z").write_text("d:4:w")  # this host's own folder at that path
    workers = [_worker("b:2:y", str(tmp_path / "elsewhere" / ".probe-b:2:y")), _worker("c:3:z", other_folder_same_path),
               _worker("gone", str(tmp_path / "nowhere"), gone=True), _worker("old", None)]
    missing, foreign = shared_state.check_peers(workers, "a:1:x")
    assert missing.startswith(f"cannot read {tmp_path / 'elsewhere'}") and "worker b:2:y on host host-b:2:y" in missing
    assert "one folder that every host mounts at the same path" in missing
    assert "is not the file worker c:3:z on host host-c:3:z wrote" in foreign


def test_a_jobs_files_and_the_first_one_this_host_cannot_read(tmp_path):
    lora, image = tmp_path / "l.safetensors", tmp_path / "c.png"
    lora.write_bytes(b"x")
    task = RenderTask(spec=RenderSpec(model="qwen_image_edit", prompt="p", lora=LoraSpec(path=str(lora)),
                                      control_images=(ControlImage(slot="ctrl_img", path=str(image)),)),
                      target=OutputTarget(out_dir="o", image_name="i.png", title="t", source="s", prompt_index=0))
    assert shared_state.job_files(task) == [str(lora), str(image)]
    assert shared_state.first_unreadable(shared_state.job_files(task)) == str(image)
    image.write_bytes(b"y")
    assert shared_state.first_unreadable(shared_state.job_files(task)) is None


def test_the_filesystem_clock_is_the_folders(tmp_path):
    assert abs(shared_state.filesystem_now(tmp_path / "snapshots") - time.time()) < 5
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == [".clock"]  # a dot file: never pruned


def test_a_local_accuracy_recovery_adapter_is_one_of_a_jobs_files(tmp_path):
    from previewd.spec import AitkOptions

    def files(ara):
        spec = RenderSpec(model="qwen_image_2512", prompt="p", aitk=AitkOptions(quantize=True, qtype="uint3", ara=ara))
        return shared_state.job_files(RenderTask(spec=spec, target=OutputTarget(
            out_dir="o", image_name="i.png", title="t", source="s", prompt_index=0)))

    assert files(str(tmp_path / "ara.safetensors")) == [str(tmp_path / "ara.safetensors")]
    assert files("ostris/accuracy_recovery_adapters/qwen_image_torchao_uint3.safetensors") == []  # each host's cache
