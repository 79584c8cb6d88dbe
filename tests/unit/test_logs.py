"""Log lines: journald priorities under systemd, no terminal escapes off a terminal."""

import io
import logging
import os

from previewd.logs import PlainFormatter, setup_logging, stream_is_journal


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("previewd.worker", level, __file__, 1, message, None, None)


def test_journal_lines_carry_the_syslog_priority_on_every_line():
    formatter = PlainFormatter(journal=True)
    assert formatter.format(_record(logging.ERROR, "job 3 failed")) == "<3>ERROR previewd.worker: job 3 failed"
    assert formatter.format(_record(logging.WARNING, "w")).startswith("<4>WARNING")
    assert formatter.format(_record(logging.INFO, "i")).startswith("<6>INFO")
    assert formatter.format(_record(logging.INFO, "a\nb")).splitlines()[1] == "<6>b"


def test_escape_codes_and_carriage_returns_are_stripped_off_a_terminal():
    line = PlainFormatter(journal=False).format(_record(logging.INFO, "\x1b[32mok\x1b[0m 50%|#####\r"))
    assert "\x1b" not in line and "\r" not in line and line.endswith("ok 50%|#####")


def test_the_journal_is_recognised_by_its_device_and_inode(tmp_path, monkeypatch):
    with open(tmp_path / "log", "w") as stream:
        stat = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert stream_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")
        assert not stream_is_journal(stream)


def test_setup_replaces_handlers_and_accepts_any_case():
    stream = io.StringIO()
    setup_logging("debug", stream)
    logging.getLogger("previewd.test").debug("hello")
    setup_logging("INFO", stream)
    logging.getLogger("previewd.test").info("again")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("previewd.test: hello")


def test_a_long_block_is_reported_while_it_runs(caplog):
    import time

    from previewd.logs import still_busy

    with caplog.at_level(logging.INFO, logger="previewd.test"):
        with still_busy(logging.getLogger("previewd.test"), "loading qwen_image_2512", every=0.05):
            time.sleep(0.18)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) >= 2 and all(m.startswith("still loading qwen_image_2512 (") for m in said)
