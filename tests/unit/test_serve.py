"""`previewd serve`: every output folder's page, read-only, and nothing outside them."""

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from previewd import outbox
from previewd.config import load_config
from previewd.instance import render_config
from previewd.manifest import RenderEntry
from previewd.serve import make_server
from previewd.tasks import OutputTarget


def _render(out_dir: Path, *, job_dir: Path | None = None, title="run"):
    target = OutputTarget(out_dir=str(out_dir), image_name="000000250_00.png", title=title, source="config.yaml",
                          checkpoint="run_000000250.safetensors", step=250, prompt_index=0,
                          job_dir=str(job_dir) if job_dir else None)
    entry = RenderEntry(model="qwen_image_2512", checkpoint=target.checkpoint, step=250, prompt_index=0, prompt="p",
                        seed=42, width=64, height=64, sample_steps=3, guidance_scale=4.0, parity="aitk")
    outbox.write_render(target, Image.new("RGB", (64, 64), "green"), entry, wait=True)


@pytest.fixture
def served(tmp_path):
    (tmp_path / "config.yaml").write_text(render_config())
    config = load_config(tmp_path / "config.yaml")
    run = config.inbox / "my_run"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text("job: extension\n")
    Image.new("RGB", (64, 64), "green").save(run / "samples" / "1__000000250_0.png")
    _render(run / "previews", job_dir=run)
    _render(config.outbox_root / "my request", title="my request")
    (tmp_path / "secret.txt").write_text("no")
    (run / "previews" / "escape.txt").symlink_to(tmp_path / "secret.txt")
    server = make_server(config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", config
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_the_index_lists_every_output_folder_and_links_its_page(served):
    base, _config = served
    status, body, headers = _get(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert "my_run/previews/" in page and "my%20request/" in page and ">my request<" in page


def test_a_run_page_its_images_and_ai_toolkits_samples_are_served(served):
    base, _config = served
    status, body, headers = _get(base + "/1/my_run/previews/")  # root 1: the inbox
    assert status == 200 and b'<script src="manifest.js"></script>' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for path in ("manifest.js", "manifest.json", "grid.png", "000000250_00.png", ".thumbs/000000250_00.png.jpg",
                 "../samples/1__000000250_0.png"):
        status, body, headers = _get(f"{base}/1/my_run/previews/{path}")
        assert status == 200 and body, path
    assert _get(base + "/1/my_run/previews/manifest.js")[2]["Content-Type"] == "text/javascript; charset=utf-8"
    status, _body, headers = _get(base + "/0/my%20request/")
    assert status == 200


@pytest.mark.parametrize("path", ["/1/my_run/config.yaml", "/1/my_run/previews/escape.txt", "/1/../secret.txt",
                                  "/1/my_run/previews/../../../secret.txt", "/1/%2e%2e/secret.txt", "/9/x",
                                  "/1/my_run/", "/0/", "/etc/passwd", "/1/my_run/previews/.manifest.lock/../../config.yaml"])
def test_nothing_outside_the_output_folders_is_served(served, path):
    base, _config = served
    status, body, _headers = _get(base + path)
    assert status == 404, (path, body[:100])


def test_it_is_read_only(served):
    base, _config = served
    request = urllib.request.Request(base + "/1/my_run/previews/manifest.json", data=b"{}", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request)
    assert raised.value.code == 501


def test_serve_binds_to_localhost_by_default():
    from previewd.cli import parser

    args = parser().parse_args(["serve", "-c", "config.yaml"])
    assert args.host == "127.0.0.1" and args.port == 8765


def test_files_planted_in_a_folder_made_to_look_like_an_output_folder_never_stall_or_leak(served, tmp_path):
    """Whoever drops files can make a folder look like an output folder: a FIFO must not hang a
    request, a link must not lead out, a huge sparse manifest must not be read."""
    base, config = served
    (tmp_path / "secret.json").write_text('{"title": "SECRET-TITLE"}')
    planted = {"fifo": lambda f: os.mkfifo(f / "manifest.json"),
               "link": lambda f: (f / "manifest.json").symlink_to(tmp_path / "secret.json"),
               "sparse": lambda f: os.truncate(_touch(f / "manifest.json"), 10 << 30)}
    for name, make in planted.items():
        folder = config.inbox / name / "previews"
        folder.mkdir(parents=True)
        (folder / ".manifest.lock").touch()
        make(folder)
        os.mkfifo(folder / "000000250_00.png")
    statuses = {}

    def fetch_all():
        statuses["/"] = _get(base + "/")
        for name in planted:
            statuses[name] = _get(f"{base}/1/{name}/previews/000000250_00.png")[0]

    fetching = threading.Thread(target=fetch_all, daemon=True)
    fetching.start()
    fetching.join(timeout=20)
    assert not fetching.is_alive(), "a request hangs on a planted FIFO"
    status, body, _headers = statuses["/"]
    assert status == 200 and b"SECRET-TITLE" not in body
    assert all(f"{name}/previews/" in body.decode() for name in planted)  # listed, by folder name
    assert [statuses[name] for name in planted] == [404, 404, 404]


def _touch(path: Path) -> Path:
    path.touch()
    return path
