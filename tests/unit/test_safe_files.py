"""The one place that opens what a dropped file leads to, and writes into output folders."""

import errno
import os
import pwd
import threading
import time

import pytest
import yaml

from previewd.config import LimitsConfig
from previewd.errors import OutboxError, shown
from previewd.safe_files import (DocumentLimit, RefusedFile, SafeDir, UnsafeFolder, open_regular, parse_json,
                                 parse_yaml, read_regular, why_unreadable)

LIMITS = LimitsConfig()


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("secret")
    return tmp_path / "root"


def test_a_regular_file_within_the_roots_is_read(root):
    (root / "a.yaml").write_text("x: 1")
    (root / "link.yaml").symlink_to(root / "a.yaml")  # a link that stays within the roots is fine
    assert read_regular(root / "a.yaml", [root], max_bytes=100) == b"x: 1"
    assert read_regular(root / "link.yaml", [root], max_bytes=100) == b"x: 1"


@pytest.mark.parametrize("make,reason", [
    (lambda root: (root / "f").symlink_to(root.parent / "outside" / "secret.txt"), "leads out of"),
    (lambda root: (root / "f").symlink_to(root.parent / "outside"), "leads out of"),
    (lambda root: os.mkfifo(root / "f"), "a FIFO, not a regular file"),
    (lambda root: (root / "f").mkdir(), "a folder, not a regular file"),
])
def test_links_out_fifos_and_folders_are_refused_without_being_opened(root, make, reason):
    make(root)
    started = time.monotonic()
    with pytest.raises(RefusedFile, match=reason):
        read_regular(root / "f", [root], max_bytes=100)
    assert time.monotonic() - started < 1  # a FIFO never blocks


def test_a_device_reached_through_a_link_is_refused(root):
    (root / "zero").symlink_to("/dev/zero")
    with pytest.raises(RefusedFile, match="a device"):
        read_regular(root / "zero", [root, "/dev"], max_bytes=100)


def test_size_is_capped_before_reading(root):
    (root / "big").write_bytes(b"x" * 101)
    with pytest.raises(RefusedFile, match="too large: 101 bytes; at most 100 bytes .limits.document_mb"):
        read_regular(root / "big", [root], max_bytes=100, limit="limits.document_mb")


def test_the_descriptor_is_checked_after_the_open(root, monkeypatch):
    (root / "a").write_text("x")
    monkeypatch.setattr("previewd.safe_files._fd_path", lambda fd: "/elsewhere/a")
    with pytest.raises(RefusedFile, match="moved out"):
        open_regular(root / "a", [root])


def test_yaml_aliases_that_expand_too_far_are_refused():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    started = time.monotonic()
    with pytest.raises(DocumentLimit, match="aliases expand it by more than 1000 nodes .limits.yaml_alias_nodes"):
        parse_yaml(bomb, LIMITS)
    assert time.monotonic() - started < 1
    assert parse_yaml("a: &a {x: 1}\nb: *a\nc: *a\n", LIMITS) == {"a": {"x": 1}, "b": {"x": 1}, "c": {"x": 1}}


def test_a_recursive_alias_is_refused():
    with pytest.raises(DocumentLimit, match="recursive"):
        parse_yaml("a: &a [1, *a]\n", LIMITS)


@pytest.mark.parametrize("parse,deep", [(parse_yaml, "[" * 5000 + "]" * 5000),
                                        (parse_json, "[" * 100000 + "]" * 100000),
                                        (parse_yaml, "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 60)))])
def test_deep_nesting_is_one_line_not_a_traceback(parse, deep):
    with pytest.raises(DocumentLimit) as refused:
        parse(deep, LIMITS)
    assert str(refused.value) == "nested deeper than 32 levels (limits.max_depth)"


def test_yaml_syntax_errors_are_one_line_without_the_source():
    with pytest.raises(yaml.YAMLError) as bad:
        parse_yaml("a: b: c\nsecret-line: [\n", LIMITS)
    assert "\n" not in str(bad.value) and str(bad.value).startswith("line 1, column 5:")


def test_names_are_shown_escaped_in_one_line():
    assert shown(os.fsdecode(b"/in/caf\xe9.yaml")) == "/in/caf\\xe9.yaml"
    assert shown("/in/x\nERROR forged.yaml") == "/in/x\\nERROR forged.yaml"


def test_safe_dir_creates_its_folders_and_refuses_links_and_fifos(tmp_path):
    out = tmp_path / "out" / "a" / "b"
    with SafeDir.open(out, [tmp_path]) as folder:
        folder.write("x.txt", b"hello")
        assert folder.read("x.txt", 100) == b"hello"
        (out / "link").symlink_to(tmp_path / "out")
        os.mkfifo(out / "fifo")
        with pytest.raises(UnsafeFolder, match="symbolic link"):
            folder.read("link", 100)
        with pytest.raises(UnsafeFolder, match="FIFO"):
            folder.read("fifo", 100)
        with pytest.raises(UnsafeFolder, match="not a plain file name"):
            folder.read("../x.txt", 100)
        folder.write("link", b"replaced")  # renamed over the link, never through it
        assert not (out / "link").is_symlink() and (out / "link").read_bytes() == b"replaced"
    assert issubclass(UnsafeFolder, OutboxError)


def test_safe_dir_refuses_a_folder_that_is_a_link_or_leads_out_of_the_roots(tmp_path):
    (tmp_path / "roots" / "run").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "roots" / "run" / "previews").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeFolder, match="a symbolic link"):
        SafeDir.open(tmp_path / "roots" / "run" / "previews", [tmp_path / "roots"])
    with SafeDir.open(tmp_path / "roots", [tmp_path / "roots"]) as root:  # a root itself is fine
        root.write("x", b"1")
    (tmp_path / "roots" / "swapped").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeFolder, match="a symbolic link"):
        SafeDir.open(tmp_path / "roots" / "swapped" / "previews", [tmp_path / "roots"])
    with pytest.raises(UnsafeFolder, match="leads out"):
        SafeDir.open(tmp_path / "elsewhere" / "previews", [tmp_path / "roots"])
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_folder_swapped_for_a_link_is_never_written_through(tmp_path):
    out = tmp_path / "out"
    folder = SafeDir.open(out, [tmp_path])
    os.rename(out, tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    out.symlink_to(tmp_path / "elsewhere")
    folder.write("x", b"1")  # through the descriptor: into the folder opened, never the link
    folder.close()
    with pytest.raises(UnsafeFolder, match="a symbolic link"):
        SafeDir.open(out, [tmp_path])
    assert (tmp_path / "moved" / "x").exists() and list((tmp_path / "elsewhere").iterdir()) == []


def test_the_lock_times_out_and_never_waits_on_a_fifo(tmp_path):
    with SafeDir.open(tmp_path / "out") as folder:
        os.mkfifo(tmp_path / "out" / "fifo.lock")
        with pytest.raises(UnsafeFolder, match="FIFO"):
            with folder.lock("fifo.lock", 1):
                pass
        held, release = threading.Event(), threading.Event()

        def hold():
            with SafeDir.open(tmp_path / "out") as other, other.lock("x.lock", 5):
                held.set()
                release.wait(5)

        thread = threading.Thread(target=hold)
        thread.start()
        held.wait(5)
        started = time.monotonic()
        with pytest.raises(UnsafeFolder, match="still locked"):
            with folder.lock("x.lock", 0.3):
                pass
        assert time.monotonic() - started < 2
        release.set()
        thread.join()


def test_why_unreadable_says_whose_permission_without_the_path():
    denied = why_unreadable(PermissionError(errno.EACCES, "Permission denied", "/runs/x/secret_name.safetensors"))
    assert denied.startswith(f"permission denied to previewd's user ({pwd.getpwuid(os.geteuid()).pw_name})")
    assert "secret_name" not in denied and "Errno" not in denied
    assert why_unreadable(IsADirectoryError(errno.EISDIR, "Is a directory", "/x")) == "Is a directory"
    assert why_unreadable(_bad_utf8()) == "not UTF-8 text (byte 2)"


def _bad_utf8() -> UnicodeDecodeError:
    try:
        b"ok\xff".decode()
    except UnicodeDecodeError as exc:
        return exc
    raise AssertionError("decoded")
