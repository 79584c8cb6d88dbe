import json
from pathlib import Path

import pytest

from previewd.cli import main
from previewd.config import load_config
from previewd.instance import render_config
from previewd.queue import JobStore


@pytest.fixture
def config_path(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(render_config())
    return path


def _queue(config_path: Path, n: int) -> list[int]:
    config = load_config(config_path)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    with JobStore(config.db_url) as store:
        store.create_schema()
        return [store.enqueue(key=f"k{i}", payload={"target": {"prompt_index": i}}, model="flux2", group="g")[0].id
                for i in range(n)]


def test_bad_config_exits_2_and_names_the_key(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("inbox: x\n")
    assert main(["status", "-c", str(bad)]) == 2
    assert "state_dir: Field required" in capsys.readouterr().err


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_status_cancel_retry(config_path, capsys):
    first, second = _queue(config_path, 2)
    assert main(["status", "-c", str(config_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["queued"] == 2
    assert main(["cancel", "-c", str(config_path), str(first)]) == 0
    assert f"#{first}: cancelled" in capsys.readouterr().out
    # All or nothing: an id in the wrong state changes nothing and fails.
    assert main(["cancel", "-c", str(config_path), str(first), str(second)]) == 1
    assert "previewd:" in capsys.readouterr().err
    assert main(["retry", "-c", str(config_path), str(first)]) == 0
    assert f"#{first}: queued" in capsys.readouterr().out
    assert main(["status", "-c", str(config_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {
        "queued": 2, "running": 0, "done": 0, "failed": 0, "cancelled": 0}


def test_submit_copies_atomically_without_overwriting(config_path, tmp_path, capsys):
    request = tmp_path / "req.yaml"
    request.write_text("model: flux2\n")
    assert main(["submit", "-c", str(config_path), str(request)]) == 0
    assert main(["submit", "-c", str(config_path), str(request)]) == 0
    inbox = load_config(config_path).inbox
    assert sorted(p.name for p in inbox.iterdir()) == ["req-1.yaml", "req.yaml"]
    assert main(["submit", "-c", str(config_path), str(tmp_path / "missing.yaml")]) == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("previewd ")


def test_config_comes_from_previewd_config_or_the_current_folder(config_path, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREVIEWD_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--json"]) == 0  # ./config.yaml
    capsys.readouterr()
    monkeypatch.setenv("PREVIEWD_CONFIG", str(tmp_path / "missing.yaml"))
    assert main(["status"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    monkeypatch.delenv("PREVIEWD_CONFIG")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["status"]) == 2
    assert "none found in: config.yaml" in capsys.readouterr().err


def test_config_errors_name_the_file_and_say_each_thing_once(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("inbox: [unclosed\n")
    assert main(["status", "-c", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err.replace("<unicode string>", "")
    bad = tmp_path / "bad.yaml"
    bad.write_text(render_config().replace("device: auto", "device: gpu0").replace("log_level: INFO", "log_level: info"))
    assert main(["status", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("'gpu0'") == 1 and "log_level" not in err


def test_retry_failed_and_cancel_by_run(config_path, capsys):
    from previewd.spec import RenderSpec
    from previewd.tasks import OutputTarget, RenderTask

    config = load_config(config_path)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    with JobStore(config.db_url) as store:
        store.create_schema()
        ids = {}
        for run in ("runA", "runB"):
            for i in range(2):
                task = RenderTask(spec=RenderSpec(model="flux2", prompt="x"), target=OutputTarget(
                    out_dir=f"/o/{run}", image_name=f"{i}.png", title=run, source="s", prompt_index=i))
                ids[run, i] = store.enqueue(key=f"{run}{i}", payload=task.model_dump(mode="json"), model="flux2",
                                            group=run)[0].id
        for _ in range(2):  # both jobs of runA fail for good
            job = store.claim("w", lease_seconds=60, prefer_model=None)
            store.fail(job.id, "w", "boom", retry_in=None)
    assert main(["retry", "-c", str(config_path)]) == 2  # says what to name
    capsys.readouterr()
    assert main(["retry", "-c", str(config_path), "--failed", "--run", "runB"]) == 0
    assert "no job to change" in capsys.readouterr().out
    assert main(["retry", "-c", str(config_path), "--failed", "--run", "runA"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"#{ids['runA', 0]}: queued", f"#{ids['runA', 1]}: queued"]
    assert main(["cancel", "-c", str(config_path), "--run", "runB"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"#{ids['runB', 0]}: cancelled", f"#{ids['runB', 1]}: cancelled"]
    assert main(["cancel", "-c", str(config_path), "--all"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
