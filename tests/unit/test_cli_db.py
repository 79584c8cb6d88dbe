"""`previewd db upgrade|current`, `run --device`, and what `status` says about workers and an
unreachable database."""

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from previewd.cli import _with_device, main, parser
from previewd.config import load_config
from previewd.instance import render_config
from previewd.queue import JobStore
from previewd.queue.migrate import script_directory

HEAD = script_directory().get_current_head()
DATA = Path(__file__).parents[1] / "queue" / "data"


@pytest.fixture
def config_path(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(render_config())
    return path


def _db(config_path: Path) -> str:
    config = load_config(config_path)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    return config.db_url


def test_db_upgrade_and_current(config_path, capsys):
    assert main(["db", "current", "-c", str(config_path)]) == 0
    assert "no schema version" in capsys.readouterr().out
    assert main(["db", "upgrade", "-c", str(config_path)]) == 0
    assert capsys.readouterr().out == f"schema upgraded from nothing to {HEAD}\n"
    assert main(["db", "upgrade", "-c", str(config_path)]) == 0
    assert capsys.readouterr().out == f"schema at {HEAD} (head)\n"
    assert main(["db", "current", "-c", str(config_path)]) == 0
    assert capsys.readouterr().out == f"{HEAD} (head)\n"


def test_db_upgrade_adopts_a_database_of_previewd_0_1(config_path, capsys):
    engine = sa.create_engine(_db(config_path))
    with engine.begin() as conn:
        conn.connection.executescript((DATA / "previewd-0.1.sqlite.sql").read_text())
    engine.dispose()
    assert main(["db", "upgrade", "-c", str(config_path)]) == 0
    assert capsys.readouterr().out == f"schema upgraded from 0001 to {HEAD}\n"


def test_a_database_of_a_newer_previewd_is_refused_by_every_command(config_path, capsys):
    with JobStore(_db(config_path)) as store:
        store.upgrade_schema()
        with store._engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff'"))
    for command in (["db", "current"], ["db", "upgrade"], ["status"], ["run"]):
        assert main([*command, "-c", str(config_path)]) == 1, command
        err = capsys.readouterr().err
        assert "schema is at revision ffff, which this previewd" in err and "newer previewd" in err, command


def test_run_device_overrides_the_config_and_is_validated(config_path, capsys):
    config = load_config(config_path)
    assert _with_device(config, "cuda:1").device == "cuda:1"
    assert _with_device(config, "cuda:1").model_copy(update={"device": config.device}) == config
    assert main(["run", "-c", str(config_path), "--device", "gpu1"]) == 2
    assert "--device gpu1: " in capsys.readouterr().err


def test_the_per_gpu_systemd_unit_passes_its_instance_as_the_device():
    unit = Path(__file__).resolve().parents[2] / "systemd" / "previewd@.service"
    [start] = [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    args = parser().parse_args([arg.replace("%i", "cuda:1") for arg in start.split()[1:]])
    assert (args.command, args.device) == ("run", "cuda:1")


def test_status_says_when_the_database_is_unreachable(tmp_path, capsys):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(render_config().replace(
        "database_url:\n", f"database_url: sqlite:///{tmp_path / 'no-such-folder' / 'q.db'}\n"))
    assert main(["status", "-c", str(config_path)]) == 1
    assert capsys.readouterr().out.startswith("database unreachable: unable to open database file")
    assert main(["status", "-c", str(config_path), "--json"]) == 1
    database = json.loads(capsys.readouterr().out)["database"]
    assert database["reachable"] is False and "unable to open" in database["error"]


def test_status_lists_workers_by_host_and_device(config_path, capsys):
    with JobStore(_db(config_path)) as store:
        store.upgrade_schema()
        job, _ = store.enqueue(key="k", payload={}, model="flux2", group="g")
        store.register_worker("b:2:x", "host-b", 2, device="cuda:0")
        store.register_worker("a:1:y", "host-a", 1, device="cuda:1")
        store.register_worker("a:3:z", "host-a", 3, device="cuda:0")
        store.worker_heartbeat("a:3:z", job.id, model="flux2")
        store.reap_workers(stale_after=0, forget_after=3600)  # all three silent "for a lease"
        store.worker_heartbeat("a:3:z", job.id, model="flux2")
        blind = store.claim("b:2:x", lease_seconds=60)
        store.release_unreadable(blind.id, "b:2:x", "host-b", "/state/checkpoints/ab.safetensors", recheck_in=300)
    assert main(["status", "-c", str(config_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"queued  #{blind.id}: host-b (b:2:x) cannot read /state/checkpoints/ab.safetensors" in out
    lines = [line for line in out if line.startswith("worker")]
    assert lines[0].startswith(f"worker host-a cuda:0: live, job #{job.id}, flux2 loaded, heartbeat 0s ago (pid 3")
    assert lines[1].startswith("worker host-a cuda:1: gone, idle, heartbeat")
    assert lines[2].startswith("worker host-b cuda:0: gone")
    assert main(["status", "-c", str(config_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["database"] == {"reachable": True, "schema": HEAD}
    assert [(u["job"], u["host"]) for u in report["unreadable"]] == [(blind.id, "host-b")]
    assert [(w["host"], w["device"], w["state"]) for w in report["workers"]] == [
        ("host-a", "cuda:0", "live"), ("host-a", "cuda:1", "gone"), ("host-b", "cuda:0", "gone")]
