"""Hostile inputs against a real `previewd run` (issue 9): over a hundred files built here, at run
time, by someone who can write into the inbox and the training folders and nothing else.

The daemon runs as `nobody` where this test can drop privileges (root, with an interpreter that
`nobody` can run), else as the current user. Canary files outside every root are world-readable,
so only previewd's own checks keep it from them; their access times are set into the past (any
read on a relatime mount updates them) and inotify watches their folders for any open, read or
write. The inputs go in three waves (intake only; renders into output folders others have
tampered with; a previews folder swapped for a link mid-run). Afterwards, for every input: the
daemon is alive and answers `status`, no canary was opened and nothing was written outside the
roots, the daemon's peak RSS stayed under a bound, the rejection is visible with its specific
reason (an error file beside the input or, where a name cannot carry one, rejected.log and
status), and a good request dropped last renders.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from previewd.instance import render_config

pytestmark = pytest.mark.slow

NOBODY = 65534
RSS_BOUND = 1 << 30
"""Peak resident memory of the daemon (torch and a tiny model take well under half of it; the
alias bombs, headers and sparse files of issue 9 each took gigabytes)."""
SECRET = "CANARY-SECRET-7f3a"
ERROR = ".error.txt"
PROMPT = "a red fox"


# -- the world: roots, canaries, the daemon ------------------------------------------------------

class Inotify:
    """Every open, read and write in the watched folders (the kernel's account, not ours)."""

    MASK = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200  # access .. delete, opens included

    def __init__(self, folders: list[Path]):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        self._names = {}
        for folder in folders:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), self.MASK)
            assert wd >= 0, folder
            self._names[wd] = folder

    def events(self) -> list[str]:
        found = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode(errors="replace")
                found.append(f"{self._names.get(wd)}/{name} mask={mask:#x}")
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


class SlowServer:
    """A local HTTP server that answers slowly; previewd must never connect to it."""

    def __init__(self):
        self.connections = 0
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self):
                server.connections += 1
                super().setup()

            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                while not server.stop.wait(0.5):
                    self.wfile.write(b"x")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _previewd_as_nobody() -> list[str] | None:
    """The command that starts `previewd` as `nobody`, or None where privileges cannot be dropped.

    The test's own interpreter may lie where `nobody` cannot reach (a pyenv build under /root, mode
    0700); the system's interpreter of the same minor version then runs the same site-packages,
    without its own (-S), so the daemon under test is the code and libraries of this checkout.
    """
    if os.geteuid() != 0:
        return None
    site_dir = sysconfig.get_paths()["purelib"]
    boot = (f"import runpy, site; site.addsitedir({site_dir!r}); "
            "runpy.run_module('previewd', run_name='__main__', alter_sys=True)")
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    for command in ([sys.executable, "-m", "previewd"], [system, "-S", "-c", boot]):
        try:
            probe = subprocess.run([*command, "--version"], user=NOBODY, group=NOBODY, extra_groups=[],
                                   capture_output=True, cwd="/", timeout=120, env=dict(os.environ, HOME="/tmp"))
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return command
    return None


@dataclass
class World:
    base: Path
    inst: Path
    config: Path
    canary: Path
    writable: Path
    model: Path
    lora: Path
    """A checkpoint of `model`, made by the test (as root: torch may lie where `nobody` cannot read)."""
    previewd: list[str]
    drop: bool
    env: dict
    server: SlowServer
    canaries: dict[Path, float] = field(default_factory=dict)

    @property
    def inbox(self) -> Path:
        return self.inst / "inbox"

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.previewd, *args, "-c", str(self.config)], capture_output=True,
                              text=True, timeout=timeout, env=self.env, cwd="/", **self.user())

    def start(self, log: Path) -> subprocess.Popen:
        return subprocess.Popen([*self.previewd, "run", "-c", str(self.config)], env=self.env,
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd="/", **self.user())

    def user(self) -> dict:
        return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if self.drop else {}

    def give(self, path: Path) -> None:
        """Hand what the test made under `path` to the daemon's user (links themselves, not their targets)."""
        if not self.drop:
            return
        for folder, dirs, files in os.walk(path):
            for name in [*dirs, *files, ""]:
                os.chown(os.path.join(folder, name), NOBODY, NOBODY, follow_symlinks=False)

    @contextlib.contextmanager
    def as_them(self):
        """Make files as the daemon's user, as a trainer in its group would: the daemon sees each
        one the moment it appears, so handing it over afterwards would race with the rejection."""
        if not self.drop:
            yield
            return
        groups = os.getgroups()
        os.setgroups([])
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)
            os.setgroups(groups)


@pytest.fixture(scope="module")
def world():
    from previewd.pipelines.tiny.qwen import write_random_lora

    base = Path(tempfile.mkdtemp(prefix="previewd-hostile-", dir="/tmp"))
    os.chmod(base, 0o755)
    subprocess.run([sys.executable, "-m", "previewd", "tiny-models", str(base / "models"), "--model",
                    "qwen_image_2512"], check=True, capture_output=True, timeout=600)
    canary = base / "canary"
    (canary / "samples").mkdir(parents=True)
    (canary / "dir").mkdir()
    writable = base / "writable"  # outside the roots and writable by anyone: only previewd's checks keep it empty
    writable.mkdir(mode=0o777)
    os.chmod(writable, 0o777)
    inst = base / "inst"
    home = base / "home"
    for folder in (inst, home):
        folder.mkdir()
    server = SlowServer()
    config = inst / "config.yaml"
    text = render_config(tiny_models_dir=str(base / "models"), settle_seconds=0.3, idle_poll_seconds=0.2)
    text = text.replace("rescan_seconds: 60", "rescan_seconds: 5").replace("max_attempts: 3", "max_attempts: 1")
    text = text.replace("incomplete_checkpoint_minutes: 10", "incomplete_checkpoint_minutes: 0.1")
    text = text.replace("allow_hosts: []", 'allow_hosts: ["127.0.0.1", "localhost"]')
    config.write_text(text)
    for sub in ("inbox", "state", "outbox"):
        (inst / sub).mkdir()
    as_nobody = _previewd_as_nobody()
    lora = write_random_lora(base / "models" / "qwen_image_2512", base / "staging" / "lora.safetensors", seed=3,
                             step=250)
    drop = as_nobody is not None
    env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    w = World(base=base, inst=inst, config=config, canary=canary, writable=writable, model=base / "models" /
              "qwen_image_2512", lora=lora, previewd=as_nobody or [sys.executable, "-m", "previewd"], drop=drop, env=env,
              server=server)
    w.give(inst)
    w.give(home)
    print(f"\ndaemon runs as {'nobody' if drop else 'the current user (cannot drop privileges here)'}")
    yield w
    server.close()
    shutil.rmtree(base, ignore_errors=True)


# -- building hostile files ----------------------------------------------------------------------

def _png(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _image(fmt: str) -> bytes:
    if fmt == "EPS":
        return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n(" + SECRET.encode() + b") print\nshowpage\n"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, fmt)
    return buf.getvalue()


def _lora_tensors(value: float = 0.0) -> dict:
    return {"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": np.full((4, 16), value, np.float32),
            "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((16, 4), np.float32)}


def _safetensors(path: Path, tensors: dict | None = None, old: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else _lora_tensors(), str(path))
    if old:
        _age(path)
    return path


def _raw(path: Path, header, data: bytes = b"", *, length: int | None = None, old: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    if old:
        _age(path)
    return path


def _age(path: Path) -> None:
    """Older than limits.incomplete_checkpoint_minutes: judged at once, not waited for."""
    old = time.time() - 3600
    os.utime(path, (old, old), follow_symlinks=False)


def _run_config(name: str, folder: Path, *, arch: str = "qwen_image:2512", base: str = "Qwen/Qwen-Image-2512",
                prompts: str = f'["{PROMPT}"]', extra_sample: str = "", steps: int = 2) -> str:
    return (f"job: extension\nconfig:\n  name: {name}\n  process:\n    - type: sd_trainer\n"
            f"      training_folder: {folder}\n      network: {{type: lora, linear: 4, linear_alpha: 4}}\n"
            f"      model: {{name_or_path: {base}, arch: \"{arch}\"}}\n"
            f"      sample:\n        width: 64\n        height: 64\n        seed: 42\n        guidance_scale: 4\n"
            f"        sample_steps: {steps}\n        prompts: {prompts}\n{extra_sample}")


def _run(w: World, name: str, **kwargs) -> Path:
    run = w.inbox / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(_run_config(name, w.inbox, **kwargs))
    return run


def _request(body: str, model: str = "qwen_image_2512") -> str:
    return f"model: {model}\nprompts:\n  - prompt: {PROMPT}\n    width: 64\n    height: 64\n    sample_steps: 2\n{body}"


def _bomb(levels: int = 9, width: int = 10) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@dataclass
class Case:
    cls: str
    name: str
    make: Callable[[World], None]
    marker: Callable[[World], Path] | None
    """The error file the rejection must appear in; None: see `check`."""
    reason: str
    check: Callable[[World], str | None] | None = None
    """Instead of (or besides) the marker: returns what is wrong, or None."""
    logged: str | None = None
    """The rejection goes to rejected.log (and status) under this path."""


def _beside(path: str) -> Callable[[World], Path]:
    return lambda w: w.inbox / (path + ERROR)


def _beside_bytes(raw: bytes) -> Callable[[World], Path]:
    return lambda w: Path(os.fsdecode(bytes(w.inbox) + b"/" + raw + ERROR.encode()))


def _write(path: str, data: str | bytes, *, old: bool = False) -> Callable[[World], None]:
    def make(w: World) -> None:
        target = w.inbox / path
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.write_bytes if isinstance(data, bytes) else target.write_text)(data)
        if old:
            _age(target)
    return make


def _link(path: str, target: Callable[[World], str]) -> Callable[[World], None]:
    def make(w: World) -> None:
        (w.inbox / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target(w), w.inbox / path)
    return make


def _fifo(path: str) -> Callable[[World], None]:
    def make(w: World) -> None:
        (w.inbox / path).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(w.inbox / path)
    return make


def _both(*makers: Callable[[World], None]) -> Callable[[World], None]:
    def make(w: World) -> None:
        for maker in makers:
            maker(w)
    return make


def _in_run(run: str, maker: Callable[[World], None], **kwargs) -> Callable[[World], None]:
    return _both(lambda w: _run(w, run, **kwargs), maker)


def _checkpoint_case(cls: str, name: str, build: Callable[[Path], None], reason: str) -> Case:
    run = f"ck_{name}"
    return Case(cls, name, _in_run(run, lambda w: build(w.inbox / run / f"{run}_000000250.safetensors")),
                _beside(f"{run}/{run}_000000250.safetensors"), reason)


def _url_case(name: str, url: Callable[[World], str], reason: str) -> Case:
    return Case("network", name, lambda w: (w.inbox / f"{name}.yaml").write_text(
        _request(f"    ctrl_img: \"{url(w)}\"\n")), _beside(f"{name}.yaml"), reason)


def _wave_a() -> list[Case]:
    canary = lambda rel: lambda w: str(w.canary / rel)  # noqa: E731
    cases = [
        # -- filesystem objects that are not plain files, or lead out of the roots --
        *[Case("filesystem", f"link_out_{ext}", _link(f"link_out.{ext}", canary(f"secret.{ext}")),
               _beside(f"link_out.{ext}"), "leads out of") for ext in ("yaml", "yml", "json")],
        Case("filesystem", "link_to_outside_folder", _link("evil_dir", canary("dir")), _beside("evil_dir"),
             "leads out of"),
        Case("filesystem", "link_to_outside_folder_named_yaml", _link("evil_dir.yaml", canary("dir")),
             _beside("evil_dir.yaml"), "leads out of"),
        Case("filesystem", "relative_link_out", _link("rel_out.yaml", lambda w: "../../canary/secret.yaml"),
             _beside("rel_out.yaml"), "leads out of"),
        Case("filesystem", "link_run_config", _both(
            lambda w: (w.inbox / "lr").mkdir(), _link("lr/config.yaml", canary("run_config.yaml")),
            lambda w: _safetensors(w.inbox / "lr" / "lr_000000250.safetensors")),
             _beside("lr/config.yaml"), "leads out of"),
        Case("filesystem", "link_checkpoint", _in_run("lc", _link("lc/lc_000000250.safetensors",
                                                               canary("lora.safetensors"))),
             _beside("lc/lc_000000250.safetensors"), "leads out of"),
        Case("filesystem", "link_lora_named_by_request", _both(
            _link("lora_link.safetensors", canary("lora.safetensors")),
            _write("names_lora_link.yaml", _request("loras:\n  - path: lora_link.safetensors\n"))),
             _beside("names_lora_link.yaml"), "outside the allowed roots"),
        Case("filesystem", "link_lora_itself", lambda w: None, _beside("lora_link.safetensors"), "leads out of"),
        Case("filesystem", "link_control_image_named_by_request", _both(
            _link("ctrl_link.png", canary("img.png")),
            _write("names_ctrl_link.yaml", _request("    ctrl_img: ctrl_link.png\n", "qwen_image_edit"))),
             _beside("names_ctrl_link.yaml"), "outside the allowed roots"),
        Case("filesystem", "link_control_image_itself", lambda w: None, _beside("ctrl_link.png"), "leads out of"),
        Case("filesystem", "run_control_image_outside", lambda w: (_run(
            w, "rc", arch="qwen_image_edit", base="Qwen/Qwen-Image-Edit", prompts="[]",
            extra_sample=f"        samples:\n          - prompt: x\n            ctrl_img: {w.canary / 'img.png'}\n"),
            _safetensors(w.inbox / "rc" / "rc_000000250.safetensors")), _beside("rc/config.yaml"), "allowed roots"),
        Case("filesystem", "request_lora_absolute_outside",
             lambda w: (w.inbox / "abs_lora.yaml").write_text(
                 _request(f"loras:\n  - path: {w.canary / 'lora.safetensors'}\n")),
             _beside("abs_lora.yaml"), "outside the allowed roots"),
        Case("filesystem", "request_lora_dotdot", _write("dotdot.yaml", _request(
            "loras:\n  - path: ../../canary/lora.safetensors\n")), _beside("dotdot.yaml"), "outside the allowed roots"),
        *[Case("filesystem", f"fifo_{ext}", _fifo(f"fifo.{ext}"), _beside(f"fifo.{ext}"), "a FIFO, not a regular file")
          for ext in ("yaml", "yml", "json")],
        Case("filesystem", "fifo_run_config", _both(lambda w: (w.inbox / "fr").mkdir(), _fifo("fr/config.yaml")),
             _beside("fr/config.yaml"), "a FIFO"),
        Case("filesystem", "fifo_checkpoint", _in_run("fc", _fifo("fc/fc_000000250.safetensors")),
             _beside("fc/fc_000000250.safetensors"), "a FIFO"),
        Case("filesystem", "fifo_control_image", _both(_fifo("fifo.png"), _write("names_fifo.yaml", _request(
            "    ctrl_img: fifo.png\n", "qwen_image_edit"))), _beside("names_fifo.yaml"), "a FIFO"),
        *[Case("filesystem", f"device_{dev}_{ext}", _link(f"dev_{dev}.{ext}", lambda w, dev=dev: f"/dev/{dev}"),
               _beside(f"dev_{dev}.{ext}"), "leads out of") for dev in ("zero", "urandom") for ext in ("yaml", "json")],
        Case("filesystem", "device_checkpoint", _in_run("dv", _link("dv/dv_000000250.safetensors",
                                                                lambda w: "/dev/zero")),
             _beside("dv/dv_000000250.safetensors"), "leads out of"),
        Case("filesystem", "socket_yaml", lambda w: _socket(w.inbox / "sock.yaml"), _beside("sock.yaml"),
             "a socket, not a regular file"),
        Case("filesystem", "link_loop", _link("loop.yaml", lambda w: "loop.yaml"), _beside("loop.yaml"),
             "symbolic link"),
        Case("filesystem", "dangling_link", _link("dangling.yaml", lambda w: "nothing-here.yaml"),
             _beside("dangling.yaml"), "leads nowhere"),
        Case("filesystem", "dangling_link_out", _link("dangling_out.yaml", lambda w: "/nonexistent/x.yaml"),
             _beside("dangling_out.yaml"), "leads out of"),
        # -- amplification --
        Case("amplification", "alias_bomb_request", _write("bomb.yaml", _bomb() + _request("")),
             _beside("bomb.yaml"), "limits.yaml_alias_nodes"),
        Case("amplification", "alias_bomb_run_config", lambda w: (_run(w, "rb"), (w.inbox / "rb" / "config.yaml")
                                                                   .write_text(_bomb() + _run_config("rb", w.inbox))),
             _beside("rb/config.yaml"), "limits.yaml_alias_nodes"),
        Case("amplification", "merge_key_bomb", _write("merge.yaml", "a: &a {x: 1, y: 2, z: 3}\n" + "".join(
            f"b{i}: &b{i} {{<<: [*{'a' if i == 0 else f'b{i - 1}'}], k{i}: [*a, *a, *a]}}\n" for i in range(40))
            + _request("")), _beside("merge.yaml"), "limits.yaml_alias_nodes"),
        Case("amplification", "aliased_prompts", _write("aliased.yaml", "model: qwen_image_2512\np: &p\n  - prompt: x\n"
                                                        "    width: 64\n    height: 64\nprompts: [" +
                                                        ", ".join(["*p"] * 400) + "]\n"),
             _beside("aliased.yaml"), "limits.yaml_alias_nodes"),
        Case("amplification", "recursive_alias", _write("recursive.yaml", "a: &a [1, *a]\n" + _request("")),
             _beside("recursive.yaml"), "recursive"),
        Case("amplification", "deep_yaml_list", _write("deep_list.yaml", "[" * 5000 + "]" * 5000),
             _beside("deep_list.yaml"), "limits.max_depth"),
        Case("amplification", "deep_yaml_map", _write("deep_map.yaml", "".join("  " * i + f"k{i}:\n"
                                                                             for i in range(200)) + "  " * 200 + "x\n"),
             _beside("deep_map.yaml"), "limits.max_depth"),
        Case("amplification", "deep_json", _write("deep.json", "[" * 100000 + "]" * 100000), _beside("deep.json"),
             "limits.max_depth"),
        Case("amplification", "deep_run_config", lambda w: (_run(w, "rd"), (w.inbox / "rd" / "config.yaml").write_text(
            _run_config("rd", w.inbox) + "deep: " + "[" * 3000 + "]" * 3000 + "\n")),
             _beside("rd/config.yaml"), "limits.max_depth"),
        Case("amplification", "ten_thousand_prompts", _write("many.json", json.dumps({
            "model": "qwen_image_2512", "prompts": [{"prompt": f"p{i}", "width": 64, "height": 64}
                                                    for i in range(10000)]})), _beside("many.json"), "at most 2048"),
        Case("amplification", "three_hundred_prompts_run", lambda w: _run(w, "rp", prompts="[" + ", ".join(
            f'"p{i}"' for i in range(300)) + "]"), _beside("rp/config.yaml"), "limits.prompts_per_file"),
        Case("amplification", "ten_megabyte_prompt", _write("long.yaml", "model: qwen_image_2512\nprompts:\n"
                                                         "  - prompt: " + "a" * (10 << 20) + "\n"),
             _beside("long.yaml"), "limits.prompt_chars"),
        Case("amplification", "twenty_megabyte_request", _write("huge.yaml", "# " + "x" * (20 << 20) + "\n"),
             _beside("huge.yaml"), "limits.document_mb"),
        Case("amplification", "million_values", _write("flat.json", "[" + ",".join(["1"] * 1_000_000) + "]"),
             _beside("flat.json"), "limits.document_nodes"),
        Case("amplification", "sweep_beyond_2048", _write("sweep.yaml", _request(
            "seeds: [" + ", ".join(str(i) for i in range(2049)) + "]\n")), _beside("sweep.yaml"), "at most 2048"),
        Case("amplification", "sixty_five_loras", _write("loras.yaml", _request("loras:\n" + "".join(
            f"  - path: l{i}.safetensors\n" for i in range(65)))), _beside("loras.yaml"), "at most 64 LoRAs"),
        _checkpoint_case("amplification", "sparse_4gb", lambda p: _sparse(p, 4 << 30), "a sparse file"),
        _checkpoint_case("amplification", "claims_4tb", lambda p: _raw(p, {
            "diffusion_model.x.lora_A.weight": {"dtype": "F32", "shape": [2**20, 2**20],
                                                "data_offsets": [0, 2**42]}}), "limits.checkpoint_gb"),
        _checkpoint_case("amplification", "header_9mb", lambda p: _raw(p, b"{" + b" " * (9 << 20) + b"}"),
                         "limits.header_mb"),
        _checkpoint_case("amplification", "header_98mb_claimed", lambda p: _raw(p, b"{}", length=98 << 20),
                         "limits.header_mb"),
        _checkpoint_case("amplification", "metadata_flood", lambda p: _raw(p, {
            "__metadata__": {"pad": "x" * (3 << 20)},
            "diffusion_model.x.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "a header of 3.0 MiB"),
        Case("amplification", "decompression_bomb_png", _both(
            lambda w: (w.inbox / "bomb.png").write_bytes(_png_bomb()),
            _write("names_bomb.yaml", _request("    ctrl_img: bomb.png\n", "qwen_image_edit"))),
             _beside("names_bomb.yaml"), "too large"),
        # -- network: URLs may name only listed hosts with public addresses; this server must never be reached --
        _url_case("url_slow_loopback", lambda w: f"http://127.0.0.1:{w.server.port}/slow.png", "refused by policy"),
        _url_case("url_localhost", lambda w: f"http://localhost:{w.server.port}/x.png", "refused by policy"),
        _url_case("url_closed_port", lambda w: "http://127.0.0.1:1/x.png", "refused by policy"),
        _url_case("url_userinfo", lambda w: f"http://user:pw@127.0.0.1:{w.server.port}/x.png", "refused by policy"),
        _url_case("url_https_loopback", lambda w: f"https://127.0.0.1:{w.server.port}/x.png", "refused by policy"),
        _url_case("url_ipv6_loopback", lambda w: f"http://[::1]:{w.server.port}/x.png", "not in urls.allow_hosts"),
        _url_case("url_metadata", lambda w: "http://169.254.169.254/latest/meta-data", "not in urls.allow_hosts"),
        _url_case("url_decimal_ip", lambda w: f"http://2130706433:{w.server.port}/x.png", "not in urls.allow_hosts"),
        _url_case("url_zero_address", lambda w: f"http://0.0.0.0:{w.server.port}/x.png", "not in urls.allow_hosts"),
        _url_case("url_bad_port", lambda w: "http://127.0.0.1:99999/x.png", "not a valid URL"),
        Case("network", "url_in_run_config", lambda w: (_run(
            w, "ru", arch="qwen_image_edit", base="Qwen/Qwen-Image-Edit", prompts="[]",
            extra_sample=f"        samples:\n          - prompt: x\n            ctrl_img: "
                         f"http://127.0.0.1:{w.server.port}/slow.png\n"),
            _safetensors(w.inbox / "ru" / "ru_000000250.safetensors")), _beside("ru/config.yaml"), "refused by policy"),
        # -- silent loss or overwrite --
        Case("silent loss", "run_config_at_inbox_root", lambda w: (w.inbox / "config.yaml").write_text(
            _run_config("inbox", w.inbox)), _beside("config.yaml"), "directly in a watched folder"),
        Case("silent loss", "output_dir_is_own_folder", _write("team/own.yaml", _request("output: {dir: .}\n")),
             _beside("team/own.yaml"), "holds this request"),
        Case("silent loss", "output_dir_holds_requests", _both(
            _write("queue/waiting.yaml", "model: nope\n"), _write("into_queue.yaml", _request("output: {dir: queue}\n"))),
             _beside("into_queue.yaml"), "holds request files"),
        Case("silent loss", "output_dir_is_the_inbox", _write("sub/to_inbox.yaml", _request("output: {dir: ..}\n")),
             _beside("sub/to_inbox.yaml"), "is a watched folder"),
        Case("silent loss", "output_dir_is_a_run", _both(lambda w: _run(w, "target_run"), _write(
            "into_run.yaml", _request("output: {dir: target_run}\n"))), _beside("into_run.yaml"), "training run"),
        Case("silent loss", "output_dir_outside", lambda w: (w.inbox / "out_dir.yaml").write_text(_request(
            f"output: {{dir: {w.writable}}}\n")), _beside("out_dir.yaml"), "outside the allowed roots"),
        Case("silent loss", "name_latin1", lambda w: _raw_name(w, b"caf\xe9.yaml"), _beside_bytes(b"caf\xe9.yaml"),
             "not valid UTF-8"),
        Case("silent loss", "name_lone_surrogate", lambda w: _raw_name(w, b"x\xed\xa0\x80.yaml"),
             _beside_bytes(b"x\xed\xa0\x80.yaml"), "not valid UTF-8"),
        Case("silent loss", "name_garbage", lambda w: _raw_name(w, b"\xff\xfe.json"), _beside_bytes(b"\xff\xfe.json"),
             "not valid UTF-8"),
        Case("silent loss", "name_255_bytes", _write("n" * 250 + ".yaml", "model: nope\n"), None, "model",
             logged="n" * 250 + ".yaml"),
        Case("silent loss", "name_255_bytes_not_utf8", lambda w: _raw_name(w, b"\xff" * 250 + b".yaml"), None,
             "not valid UTF-8", logged="\\xff" * 250 + ".yaml"),
        Case("silent loss", "name_with_newline", _write("forged\nERROR previewd forged.yaml", "model: nope\n"),
             _beside("forged\nERROR previewd forged.yaml"), "model"),
        # -- inputs that would otherwise wait forever or fail later, invisibly --
        _checkpoint_case("invisible", "zero_bytes", lambda p: (p.write_bytes(b""), _age(p)), "incomplete"),
        _checkpoint_case("invisible", "four_bytes", lambda p: (p.write_bytes(b"\x10\0\0\0"), _age(p)), "incomplete"),
        _checkpoint_case("invisible", "header_longer_than_file", lambda p: _raw(p, b"{}", length=4096), "incomplete"),
        _checkpoint_case("invisible", "data_cut_short", lambda p: _raw(p, {
            "diffusion_model.x.lora_A.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}},
            b"\0" * 100), "incomplete"),
        _checkpoint_case("invisible", "not_json", lambda p: _raw(p, b"\x80\x04notjson"), "not valid JSON"),
        _checkpoint_case("invisible", "json_array", lambda p: _raw(p, b"[1, 2]"), "not an object"),
        _checkpoint_case("invisible", "bad_offsets", lambda p: _raw(p, {
            "x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}), "invalid data_offsets"),
        _checkpoint_case("invisible", "unknown_dtype", lambda p: _raw(p, {
            "x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
        _checkpoint_case("invisible", "overlapping", lambda p: _raw(p, {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "does not start where"),
        _checkpoint_case("invisible", "longer_than_header_says", lambda p: _raw(p, {
            "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 40), "accounts for"),
        _checkpoint_case("invisible", "not_lora_keys", lambda p: _safetensors(p, {"weight": np.ones((2, 2), np.float32)}),
                         "is not a LoRA weight"),
        _checkpoint_case("invisible", "half_a_lora", lambda p: _safetensors(p, {
            "diffusion_model.x.lora_A.weight": np.ones((4, 16), np.float32)}), "only one of its two"),
        _checkpoint_case("invisible", "shapes_mismatch", lambda p: _safetensors(p, {
            "diffusion_model.x.lora_A.weight": np.ones((4, 16), np.float32),
            "diffusion_model.x.lora_B.weight": np.ones((16, 3), np.float32)}), "incompatible LoRA shapes"),
        _checkpoint_case("invisible", "modules_match_nothing", lambda p: _safetensors(p, {
            "diffusion_model.x.lora_A.weight": np.ones((4, 16), np.float32),
            "diffusion_model.x.lora_B.weight": np.ones((16, 4), np.float32)}), "none of the 1 LoRA modules exists"),
        _checkpoint_case("invisible", "lokr", lambda p: _safetensors(p, {"diffusion_model.x.lokr_w1": np.ones(2)}),
                         "unsupported LoRA variant"),
        _checkpoint_case("invisible", "integer_weights", lambda p: _safetensors(p, {
            "diffusion_model.x.lora_A.weight": np.ones((4, 16), np.int32),
            "diffusion_model.x.lora_B.weight": np.ones((16, 4), np.int32)}), "not a floating-point tensor"),
        _checkpoint_case("invisible", "nan_weights", lambda p: _safetensors(p, _lora_tensors(float("nan"))),
                         "NaN or infinite"),
        _checkpoint_case("invisible", "inf_weights", lambda p: _safetensors(p, _lora_tensors(float("inf"))),
                         "NaN or infinite"),
        _checkpoint_case("invisible", "bf16_nan", lambda p: _raw(p, {
            "diffusion_model.x.lora_A.weight": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
            "diffusion_model.x.lora_B.weight": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]}},
            struct.pack("<8H", 0x3F80, 0x7FC0, 0x3F80, 0x3F80, 0, 0, 0, 0)), "NaN or infinite"),
        Case("invisible", "seed_beyond_2_64", _write("seed.yaml", _request("").replace(
            "sample_steps: 2\n", "sample_steps: 2\n    seed: 18446744073709551616\n")), _beside("seed.yaml"),
             "beyond what torch.manual_seed accepts"),
        Case("invisible", "one_step", _write("one_step.yaml", _request("").replace("sample_steps: 2", "sample_steps: 1")),
             _beside("one_step.yaml"), "1 cannot render"),
        Case("invisible", "one_step_run", lambda w: _run(w, "r1", steps=1), _beside("r1/config.yaml"),
             "1 cannot render"),
        Case("invisible", "multiplier_inf", _write("mult_inf.yaml", _request("").replace(
            "sample_steps: 2\n", "sample_steps: 2\n    network_multiplier: .inf\n")), _beside("mult_inf.yaml"),
             "network_multiplier"),
        Case("invisible", "multiplier_nan", _write("mult_nan.yaml", _request("").replace(
            "sample_steps: 2\n", "sample_steps: 2\n    network_multiplier: .nan\n")), _beside("mult_nan.yaml"),
             "network_multiplier"),
        Case("invisible", "guidance_nan", _write("cfg_nan.yaml", _request("").replace(
            "sample_steps: 2\n", "sample_steps: 2\n    guidance_scale: .nan\n")), _beside("cfg_nan.yaml"),
             "guidance_scale"),
        Case("invisible", "width_huge", _write("wide.yaml", _request("").replace("width: 64", "width: 100000")),
             _beside("wide.yaml"), "width"),
        *[Case("invisible", f"control_{fmt.lower()}", _both(
            lambda w, fmt=fmt: (w.inbox / f"ctrl.{fmt.lower()}").write_bytes(_image(fmt)),
            _write(f"ctrl_{fmt.lower()}.yaml", _request(f"    ctrl_img: ctrl.{fmt.lower()}\n", "qwen_image_edit"))),
            _beside(f"ctrl_{fmt.lower()}.yaml"), "not an image (PNG, JPEG or WebP)")
          for fmt in ("EPS", "GIF", "TIFF", "BMP")],
        Case("invisible", "control_truncated_png", _both(
            lambda w: (w.inbox / "trunc.png").write_bytes(_png((64, 64))[:70]),
            _write("ctrl_trunc.yaml", _request("    ctrl_img: trunc.png\n", "qwen_image_edit"))),
             _beside("ctrl_trunc.yaml"), "not an image"),
        Case("invisible", "control_svg", _both(
            _write("img.svg", f"<svg xmlns='http://www.w3.org/2000/svg'><text>{SECRET}</text></svg>"),
            _write("ctrl_svg.yaml", _request("    ctrl_img: img.svg\n", "qwen_image_edit"))),
             _beside("ctrl_svg.yaml"), "not an image"),
        Case("invisible", "pickle_ckpt", _write("weights.ckpt", b"\x80\x04cos\nsystem\n"), _beside("weights.ckpt"),
             "pickled weights are never loaded"),
        Case("invisible", "pickle_pt", _write("weights.pt", b"\x80\x04cos\nsystem\n"), _beside("weights.pt"),
             "pickled weights are never loaded"),
        Case("invisible", "top_level_list", _write("list.yaml", "- model: x\n"), _beside("list.yaml"), "(top level)"),
        Case("invisible", "binary_yaml", _write("binary.yaml", b"\xff\xfe\x00model"), _beside("binary.yaml"),
             "cannot read"),
        Case("invisible", "python_tag", _write("tag.yaml", "!!python/object/apply:os.system ['touch /tmp/pwned']\n"),
             _beside("tag.yaml"), "constructor"),
        Case("invisible", "unknown_model", _write("model.yaml", _request("", "sdxl")), _beside("model.yaml"),
             "unknown model id"),
    ]
    return cases


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


def _raw_name(w: World, raw: bytes) -> None:
    with open(bytes(w.inbox) + b"/" + raw, "w") as handle:
        handle.write(_request(""))


def _sparse(path: Path, size: int) -> None:
    half = size // 2
    header = {"diffusion_model.x.lora_A.weight": {"dtype": "F32", "shape": [half // 4], "data_offsets": [0, half]},
              "diffusion_model.x.lora_B.weight": {"dtype": "F32", "shape": [half // 4, 1],
                                                  "data_offsets": [half, size]}}
    _raw(path, header, old=False)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size + size)
    _age(path)


def _png_bomb() -> bytes:
    """A small PNG whose header declares 20000 x 20000 pixels."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


# -- wave B: output folders others have tampered with ----------------------------------------------

def _render_run(name: str, tamper: Callable[[World, Path], None], *, check, cls: str = "output folder",
                reason: str | None = None, marker: str | None = None) -> Case:
    def make(w: World) -> None:
        run = _run(w, name)
        tamper(w, run)
        shutil.copyfile(w.lora, run / f"{name}_000000250.safetensors")
    return Case(cls, name, make, (lambda w: w.inbox / marker) if marker else None, reason or "", check=check)


def _previews(w: World, name: str) -> Path:
    return w.inbox / name / "previews"


def _rendered(name: str) -> Callable[[World], str | None]:
    def check(w: World) -> str | None:
        image = _previews(w, name) / "000000250_00.png"
        if image.is_symlink() or not image.is_file():
            return f"{image} was not rendered in place"
        return None
    return check


def _failed_visibly(name: str, reason: str) -> Callable[[World], str | None]:
    def check(w: World) -> str | None:
        marker = w.inbox / name / ("previews" + ERROR)
        if not marker.is_file():
            return f"no {marker}"
        return None if reason in marker.read_text() else f"{marker} lacks {reason!r}: {marker.read_text()[:300]}"
    return check


def _wave_b() -> list[Case]:
    def plant(rel: str, make: Callable[[World, Path], None]) -> Callable[[World, Path], None]:
        def tamper(w: World, run: Path) -> None:
            target = run / "previews" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            make(w, target)
        return tamper

    link = lambda where: lambda w, target: os.symlink(where(w), target)  # noqa: E731
    fifo = lambda w, target: os.mkfifo(target)  # noqa: E731
    return [
        _render_run("o_lock_link", plant(".manifest.lock", link(lambda w: w.writable / "lock")),
                    check=_failed_visibly("o_lock_link", "not a regular file")),
        _render_run("o_lock_fifo", plant(".manifest.lock", fifo), check=_failed_visibly("o_lock_fifo", "not a regular file")),
        _render_run("o_thumbs_link", lambda w, run: ((run / "previews").mkdir(), os.symlink(w.writable,
                                                                                          run / "previews" / ".thumbs")),
                    check=_rendered("o_thumbs_link")),
        _render_run("o_thumb_file_link", plant(".thumbs/000000250_00.png.jpg", link(lambda w: w.canary / "img.jpg")),
                    check=_rendered("o_thumb_file_link")),
        _render_run("o_manifest_link", plant("manifest.json", link(lambda w: w.canary / "manifest.json")),
                    check=_rendered("o_manifest_link")),
        _render_run("o_manifest_fifo", plant("manifest.json", fifo), check=_rendered("o_manifest_fifo")),
        _render_run("o_grid_link", plant("grid.png", link(lambda w: w.writable / "grid.png")),
                    check=_rendered("o_grid_link")),
        _render_run("o_page_fifo", plant("index.html", fifo), check=_rendered("o_page_fifo")),
        _render_run("o_image_link", plant("000000250_00.png", link(lambda w: w.writable / "img.png")),
                    check=_rendered("o_image_link")),
        _render_run("o_previews_link", lambda w, run: os.symlink(w.writable, run / "previews"), check=None,
                    reason="symbolic link or a file", marker="o_previews_link/config.yaml" + ERROR),
        _render_run("o_previews_file", lambda w, run: (run / "previews").write_text("x"), check=None,
                    reason="symbolic link or a file", marker="o_previews_file/config.yaml" + ERROR),
        _render_run("o_sample_link", lambda w, run: ((run / "samples").mkdir(), os.symlink(
            w.canary / "img.jpg", run / "samples" / "1724085406830__000000250_0.jpg")), check=_rendered("o_sample_link")),
        _render_run("o_manifest_points_out", plant("manifest.json", lambda w, target: target.write_text(json.dumps({
            "version": 2, "job_dir": os.path.relpath(w.canary, target.parent), "renders": [], "pending": [],
            "failed": []}))), check=_rendered("o_manifest_points_out")),
    ]


# -- the test --------------------------------------------------------------------------------------

def _make_canaries(w: World) -> None:
    texts = {"secret.yaml": f"model: qwen_image_2512\nprompts: [{{prompt: {SECRET}}}]\n",
             "secret.yml": f"model: qwen_image_2512\nprompts: [{{prompt: {SECRET}}}]\n",
             "secret.json": json.dumps({"model": "qwen_image_2512", "prompts": [{"prompt": SECRET}]}),
             "run_config.yaml": _run_config("lr", w.inbox).replace(PROMPT, SECRET),
             "dir/req.yaml": f"model: qwen_image_2512\nprompts: [{{prompt: {SECRET}}}]\n",
             "manifest.json": json.dumps({"version": 2, "title": SECRET, "renders": [], "pending": [], "failed": []})}
    for rel, text in texts.items():
        (w.canary / rel).write_text(text)
    (w.canary / "img.png").write_bytes(_png())
    Image.new("RGB", (64, 64), (255, 0, 255)).save(w.canary / "img.jpg")
    Image.new("RGB", (64, 64), (255, 0, 255)).save(w.canary / "samples" / "1724085406830__000000250_0.jpg")
    save_file(_lora_tensors(1.0), str(w.canary / "lora.safetensors"))
    old = time.time() - 2 * 86400
    for path in list(w.canary.rglob("*")):  # listed first: listing a folder after its utime would touch it
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.utime(path, (old, old))
        w.canaries[path] = os.stat(path).st_atime


def _wait(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) while waiting for {what}:\n"
                                 f"{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.3)
    missing = "\n".join(getattr(predicate, "missing", []))
    raise AssertionError(f"timed out waiting for {what}:\n{missing}\n{log.read_text(errors='replace')[-3000:]}")


def _visible(w: World, case: Case, logged: list[dict]) -> str | None:
    """What is wrong with the case's rejection (None: visible with its reason, no canary content)."""
    if case.logged is not None:
        entries = [e for e in logged if e["path"].endswith(case.logged)]
        if not entries:
            return "not in rejected.log / status"
        return None if any(case.reason in e["reason"] for e in entries) else f"reason not {case.reason!r}: {entries}"
    if case.marker is None:
        return case.check(w) if case.check else None
    marker = case.marker(w)
    if not os.path.isfile(marker):
        return f"no error file {marker}"
    text = Path(marker).read_text(errors="replace")
    if SECRET in text or "Traceback" in text:
        return "the error file quotes an outside file or a traceback"
    if case.reason is not None and case.reason not in text:
        return f"reason {case.reason!r} not in {text[:400]!r}"
    return case.check(w) if case.check else None


def _status(w: World) -> dict:
    done = w.run("status", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _alive(w: World, proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the daemon died"
    report = _status(w)
    ages = [worker["heartbeat_age_seconds"] for worker in report["workers"] if worker["state"] == "live"]
    assert ages and min(ages) < 10, report["workers"]


def _settled(w: World, cases: list[Case]) -> Callable[[], bool]:
    def done() -> bool:
        report = _status(w)
        if report["counts"].get("queued", 0) or report["counts"].get("running", 0):
            done.missing = ["jobs still queued or running"]
            return False
        logged = report.get("rejected_log", [])
        done.missing = [f"{case.name}: {problem}" for case in cases if (problem := _visible(w, case, logged))]
        return not done.missing
    done.missing = []
    return done


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_hostile_inputs_do_no_harm_and_are_each_refused_visibly(world: World):
    w = world
    started = time.monotonic()
    wave_a, wave_b = _wave_a(), _wave_b()
    cases = wave_a + wave_b + ["swap"]  # the folder swapped mid-run is one more input
    assert len(cases) >= 100, len(cases)
    classes = {}
    for case in wave_a + wave_b:
        classes[case.cls] = classes.get(case.cls, 0) + 1
    classes["output folder"] += 1
    print(f"{len(cases)} hostile inputs: " + ", ".join(f"{n} {cls}" for cls, n in classes.items()))

    _make_canaries(w)
    writable_before = os.stat(w.writable).st_mtime_ns
    watch = Inotify([w.canary, w.canary / "samples", w.canary / "dir", w.writable])
    log = w.base / "daemon.log"
    proc = w.start(log)
    try:
        _wait(lambda: "watching" in log.read_text(errors="replace"), 120, "start-up", proc, log)

        # Wave A: intake only.
        with w.as_them():
            for case in wave_a:
                case.make(w)
        _wait(_settled(w, wave_a), 90, "every wave-A rejection", proc, log)
        _alive(w, proc)

        # Wave B: renders into tampered output folders.
        with w.as_them():
            for case in wave_b:
                case.make(w)
        _wait(_settled(w, wave_b), 300, "every wave-B render or rejection", proc, log)
        _alive(w, proc)

        # Wave C: the previews folder swapped for a link to the outside after the first image.
        _swap_mid_run(w, proc, log)
        _alive(w, proc)

        # Last: a good request renders, as does one with the same stem in another syntax.
        with w.as_them():
            (w.inbox / "good.yaml").write_text(_request(""))
            (w.inbox / "good.json").write_text(json.dumps({"model": "qwen_image_2512", "prompts": [
                {"prompt": "a blue fox", "width": 64, "height": 64, "sample_steps": 2}]}))
        outbox = w.inst / "outbox"
        _wait(lambda: (outbox / "good" / "base_00.png").is_file() and (outbox / "good.json" / "base_00.png").is_file(),
              180, "the good requests", proc, log)
        with Image.open(outbox / "good" / "base_00.png") as image:
            assert image.size == (64, 64)
        _alive(w, proc)
        peak = _peak_rss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    events = watch.events()
    watch.close()

    text = log.read_text(errors="replace")
    report_lines = []
    logged = _status(w).get("rejected_log", [])
    for case in wave_a + wave_b:
        problem = _visible(w, case, logged)
        if problem:
            report_lines.append(f"{case.cls}/{case.name}: {problem}")
    assert not report_lines, "\n".join(report_lines)
    touched = {str(path): (atime, os.stat(path).st_atime) for path, atime in w.canaries.items()
               if os.stat(path).st_atime != atime}
    assert not touched, f"canaries read: {touched}"
    assert not events, f"outside the roots: {events}"
    assert os.stat(w.writable).st_mtime_ns == writable_before and list(w.writable.iterdir()) == []
    assert w.server.connections == 0
    said = {line.split("ctrl_img: ", 1)[1] for name in ("url_slow_loopback", "url_closed_port")
            for line in (w.inbox / f"{name}.yaml{ERROR}").read_text().splitlines() if "ctrl_img: " in line}
    assert len(said) == 1, said  # an open port reads exactly as a closed one
    assert peak < RSS_BOUND, f"peak RSS {peak / 2**20:.0f} MiB"
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]
    assert "\nERROR previewd forged" not in text  # a newline in a file name forges no log line
    print(f"peak RSS {peak / 2**20:.0f} MiB; {time.monotonic() - started:.0f}s")


def _swap_mid_run(w: World, proc: subprocess.Popen, log: Path) -> None:
    from previewd.pipelines.tiny.qwen import write_random_lora

    staged = [write_random_lora(w.model, w.base / "staging" / f"swap{step}.safetensors", seed=step, step=step)
              for step in (250, 500, 750, 1000)]
    with w.as_them():
        run = _run(w, "o_swap", steps=40)
        for step, lora in zip((250, 500, 750, 1000), staged):
            shutil.copyfile(lora, run / f"o_swap_{step:09d}.safetensors")
    previews = run / "previews"
    _wait(lambda: any(previews.glob("0*.png")), 180, "the first image of the swapped run", proc, log)
    with w.as_them():
        os.rename(previews, run / "previews.old")
        os.symlink(w.writable, previews)
    _wait(lambda: _status(w)["counts"].get("queued", 0) == 0 and not _status(w)["counts"].get("running"),
          240, "the swapped run's jobs", proc, log)
    written = sorted(p.name for p in (run / "previews.old").glob("0*.png"))
    assert written and len(written) < 4, written  # the first image(s) only; the rest refused, not redirected
    marker = run / ("previews" + ERROR)
    assert marker.is_file() and "symbolic link" in marker.read_text(), marker


def test_a_deleted_queue_database_stops_the_daemon_and_is_not_started_afresh(world: World, tmp_path):
    w = world
    db = w.inst / "state" / "previewd.db"
    log = w.base / "database.log"
    proc = w.start(log)
    try:
        _wait(lambda: "watching" in log.read_text(errors="replace"), 120, "start-up", proc, log)
        db.unlink()
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "the queue database was deleted while previewd ran: stopping" in log.read_text(), log.read_text()
    assert not db.exists()  # no connection made meanwhile created an empty one in its place
    again = w.start(log)
    assert again.wait(timeout=120) == 1
    assert "the queue database is missing" in log.read_text().split("was deleted while previewd ran")[1]
    text = log.read_text()
    assert "Traceback" not in text, text[text.index("Traceback") - 500:][:4000]
    upgraded = w.run("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    proc = w.start(log)
    try:
        _wait(lambda: log.read_text().count("watching") >= 2, 120, "a start on the adopted database", proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_files_the_daemon_cannot_read_are_refused_beside_them(world: World):
    """A trainer's files that previewd's user may not read (safetensors 0.8 writes every file
    0600, whatever the umask) are refused with that reason, not waited for or lost."""
    w = world
    if not w.drop:
        pytest.skip("the daemon runs as the current user, who reads everything here")
    with w.as_them():
        _run(w, "unreadable")
    run = w.inbox / "unreadable"
    checkpoint = run / "unreadable_000000250.safetensors"
    request = w.inbox / "unreadable.yaml"
    shutil.copyfile(w.lora, checkpoint)
    request.write_text(_request(""))
    for path in (checkpoint, request):
        os.chmod(path, 0o600)
        _age(path)
    log = w.base / "unreadable.log"
    proc = w.start(log)
    try:
        markers = [Path(f"{path}{ERROR}") for path in (checkpoint, request)]
        _wait(lambda: all(marker.is_file() for marker in markers), 120, "both error files", proc, log)
        _alive(w, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    for marker in markers:
        text = marker.read_text()
        assert "permission denied to previewd's user (nobody)" in text and "Errno" not in text, text
