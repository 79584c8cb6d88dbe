import threading
import time
from pathlib import Path

from previewd.inbox import InboxWatcher


class Recorder:
    def __init__(self, ready=lambda p: True):
        self.seen: list[tuple[Path, int]] = []
        self.ready = ready
        self.event = threading.Event()

    def __call__(self, path: Path) -> bool:
        self.seen.append((path, path.stat().st_size))
        self.event.set()
        return self.ready(path)


def _watch(tmp_path, recorder, **kw):
    watcher = InboxWatcher([tmp_path], recorder, ignore=lambda p: p.name.startswith("."),
                           settle_seconds=kw.pop("settle", 0.6), rescan_seconds=kw.pop("rescan", 60), **kw)
    watcher.start()
    return watcher


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_existing_files_are_found_at_start_and_delivered_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text("x")
    (tmp_path / ".hidden.yaml").write_text("x")
    recorder = Recorder()
    watcher = _watch(tmp_path, recorder)
    try:
        assert _wait(lambda: recorder.seen)
        time.sleep(1.0)
        watcher.rescan()
        time.sleep(1.0)
    finally:
        watcher.stop()
    assert recorder.seen == [(tmp_path / "sub" / "a.yaml", 1)]


def test_a_file_is_delivered_only_after_it_stops_growing(tmp_path):
    recorder = Recorder()
    watcher = _watch(tmp_path, recorder)
    target = tmp_path / "ckpt.safetensors"
    try:
        with open(target, "wb") as handle:
            for _ in range(8):
                handle.write(b"x" * 100)
                handle.flush()
                time.sleep(0.2)  # faster than the settle window: never looks finished
        assert _wait(lambda: recorder.seen)
        assert not watcher.idle or recorder.seen
    finally:
        watcher.stop()
    assert recorder.seen == [(target, 800)]


def test_not_ready_files_are_offered_again_and_changed_files_again(tmp_path):
    answers = iter([False, True, True])
    recorder = Recorder(ready=lambda p: next(answers))
    watcher = _watch(tmp_path, recorder)
    target = tmp_path / "r.json"
    try:
        target.write_text("{}")
        assert _wait(lambda: len(recorder.seen) == 2)
        target.write_text('{"changed": 1}')
        assert _wait(lambda: len(recorder.seen) == 3)
        assert _wait(lambda: watcher.idle)
    finally:
        watcher.stop()
    assert [size for _, size in recorder.seen] == [2, 2, 14]


def test_periodic_rescan_finds_files_whose_events_were_lost(tmp_path):
    recorder = Recorder()
    watcher = _watch(tmp_path, recorder, rescan=0.5)
    try:
        watcher._observer.stop()  # simulate lost events: only the rescan can find the file
        watcher._observer.join()
        (tmp_path / "late.yaml").write_text("x")
        assert _wait(lambda: recorder.seen)
    finally:
        watcher.stop()
    assert recorder.seen[0][0] == tmp_path / "late.yaml"
