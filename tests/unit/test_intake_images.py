import base64
import hashlib
import http.server
import io
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from previewd.errors import ControlImageError
from previewd.intake.images import ControlImageStore
from previewd.intake.urls import UrlFetcher, UrlPending, UrlRefused, public_address


def png_bytes(size=(12, 8), color="blue"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path):
    (tmp_path / "inbox").mkdir()
    return ControlImageStore(tmp_path / "store", allowed_roots=[tmp_path / "inbox"])


def test_local_relative_path_is_snapshotted(store, tmp_path):
    data = png_bytes()
    (tmp_path / "inbox" / "c.png").write_bytes(data)
    got = store.resolve("c.png", tmp_path / "inbox", "prompts.0.ctrl_img")
    digest = hashlib.sha256(data).hexdigest()
    assert got.sha256 == digest and got.path == str(tmp_path / "store" / f"{digest}.png")
    assert (got.width, got.height) == (12, 8)
    assert (tmp_path / "store" / f"{digest}.png").read_bytes() == data
    assert [p.name for p in (tmp_path / "store").iterdir()] == [f"{digest}.png"]  # no temp left


def test_base64_and_data_uri(store, tmp_path):
    data = png_bytes()
    b64 = base64.b64encode(data).decode()
    plain = store.resolve(b64, tmp_path, "f")
    uri = store.resolve(f"data:image/png;base64,{b64}", tmp_path, "f")
    wrapped = store.resolve("\n".join(b64[i:i + 60] for i in range(0, len(b64), 60)), tmp_path, "f")
    assert plain == uri == wrapped
    assert plain.sha256 == hashlib.sha256(data).hexdigest()


def test_jpeg_extension(store, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    got = store.resolve(base64.b64encode(buf.getvalue()).decode(), tmp_path, "f")
    assert got.path.endswith(".jpg")


@pytest.mark.parametrize("source,reason", [
    ("nothere.png", "file not found"),
    ("../outside.png", "outside the allowed roots"),
    ("data:image/png,abc", "not base64-encoded"),
    ("A" * 100, "not an image"),
    ("not base64 at all and not a file", "file not found"),
])
def test_refusals_name_the_field(store, tmp_path, source, reason):
    (tmp_path / "outside.png").write_bytes(png_bytes())
    with pytest.raises(ControlImageError) as err:
        store.resolve(source, tmp_path / "inbox", "prompts.3.ctrl_img_2")
    assert str(err.value).startswith("prompts.3.ctrl_img_2: ")
    assert reason in str(err.value)


def test_outside_roots_message_says_how_to_allow(store, tmp_path):
    (tmp_path / "outside.png").write_bytes(png_bytes())
    with pytest.raises(ControlImageError, match="allowed_roots"):
        store.resolve(str(tmp_path / "outside.png"), tmp_path / "inbox", "f")


def test_symlink_cannot_escape(store, tmp_path):
    (tmp_path / "outside.png").write_bytes(png_bytes())
    (tmp_path / "inbox" / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(ControlImageError, match="outside the allowed roots"):
        store.resolve("link.png", tmp_path / "inbox", "f")


def test_trusted_reads_any_local_file(tmp_path):
    (tmp_path / "outside.png").write_bytes(png_bytes())
    store = ControlImageStore(tmp_path / "store", allowed_roots=[], trusted=True)
    assert store.resolve(str(tmp_path / "outside.png"), tmp_path, "f").width == 12


def test_limits(tmp_path):
    (tmp_path / "big.png").write_bytes(png_bytes((300, 300)))
    small = ControlImageStore(tmp_path / "s", allowed_roots=[tmp_path], max_bytes=100)
    with pytest.raises(ControlImageError, match="too large: 911 bytes; at most 100 bytes .limits.image_mb"):
        small.resolve("big.png", tmp_path, "f")
    few = ControlImageStore(tmp_path / "s", allowed_roots=[tmp_path], max_pixels=10_000)
    with pytest.raises(ControlImageError, match="too large: 300x300 pixels"):
        few.resolve("big.png", tmp_path, "f")


def test_truncated_image(store, tmp_path):
    (tmp_path / "inbox" / "t.png").write_bytes(png_bytes((64, 64))[:60])
    with pytest.raises(ControlImageError, match="not an image"):
        store.resolve("t.png", tmp_path / "inbox", "f")


@pytest.fixture
def server():
    body = png_bytes()
    slow = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/c.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/elsewhere":
                self.send_response(302)
                self.send_header("Location", "http://localhost:1/c.png")
                self.end_headers()
            elif self.path == "/again":
                self.send_response(302)
                self.send_header("Location", "/c.png")
                self.end_headers()
            elif self.path == "/slow":  # dribbles: no single read ever times out
                self.send_response(200)
                self.end_headers()
                while not slow.wait(0.2):
                    self.wfile.write(b"x")
                    self.wfile.flush()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", body
    slow.set()
    httpd.shutdown()
    httpd.server_close()


def _loopback_fetcher(**kwargs):
    # The daemon's fetcher refuses loopback whatever is listed; this one admits the test's server.
    options = {"timeout": 5, "max_bytes": 1 << 20} | kwargs
    return UrlFetcher(("127.0.0.1",), address_allowed=lambda address: address == "127.0.0.1", **options)


def test_url(tmp_path, server):
    base, body = server
    store = ControlImageStore(tmp_path / "store", allowed_roots=[], fetcher=_loopback_fetcher())
    assert store.resolve(f"{base}/c.png", tmp_path, "f").sha256 == hashlib.sha256(body).hexdigest()
    assert store.resolve(f"{base}/again", tmp_path, "f").sha256 == hashlib.sha256(body).hexdigest()
    with pytest.raises(ControlImageError, match=r"could not fetch the URL: failed \(HTTP 404\)"):
        store.resolve(f"{base}/nope.png", tmp_path, "f")
    with pytest.raises(ControlImageError, match="larger than 10 bytes"):
        ControlImageStore(tmp_path / "s", allowed_roots=[], fetcher=_loopback_fetcher(max_bytes=10)).resolve(
            f"{base}/c.png", tmp_path, "f")


def test_urls_are_off_unless_the_host_is_listed_and_never_reach_private_addresses(tmp_path, server):
    base, _body = server
    off = ControlImageStore(tmp_path / "s", allowed_roots=[])
    with pytest.raises(ControlImageError, match="refused by policy .URLs are off"):
        off.resolve(f"{base}/c.png", tmp_path, "f")
    listed = ControlImageStore(tmp_path / "s", allowed_roots=[],
                               fetcher=UrlFetcher(("127.0.0.1", "localhost", "169.254.169.254"), timeout=5,
                                                  max_bytes=1 << 20))
    for url in (f"{base}/c.png", "http://localhost:9/c.png", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(ControlImageError) as refused:
            listed.resolve(url, tmp_path, "f")
        # The same words whatever listens there: no port scanning through error messages.
        assert str(refused.value) == "f: could not fetch the URL: refused by policy"
    with pytest.raises(ControlImageError, match="not in urls.allow_hosts"):
        listed.resolve("http://example.com/c.png", tmp_path, "f")
    with pytest.raises(UrlRefused, match="http and https only"):
        listed.fetcher.check("ftp://127.0.0.1/c.png")
    assert public_address("8.8.8.8") and not public_address("::ffff:127.0.0.1") and not public_address("10.1.2.3")


def test_a_redirect_to_another_host_and_a_slow_server_are_cut_short(tmp_path, server):
    base, _body = server
    fetcher = _loopback_fetcher(timeout=1.5)
    with pytest.raises(UrlRefused, match="redirect to another host"):
        fetcher.get(f"{base}/elsewhere", wait=True)
    started = time.monotonic()
    with pytest.raises(UrlRefused, match="took longer than 1.5s"):
        fetcher.get(f"{base}/slow", wait=True)
    assert time.monotonic() - started < 4


def test_intake_is_not_blocked_by_a_download(tmp_path, server):
    base, body = server
    fetcher = _loopback_fetcher(timeout=3)
    with pytest.raises(UrlPending):
        fetcher.get(f"{base}/slow")  # returns at once; the download runs on the pool
    store = ControlImageStore(tmp_path / "s", allowed_roots=[], fetcher=fetcher, wait_for_urls=False)
    with pytest.raises(UrlPending):
        store.fetch(f"{base}/c.png", tmp_path, "f")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            assert store.fetch(f"{base}/c.png", tmp_path, "f")[1] == body
            break
        except UrlPending:
            time.sleep(0.05)
    else:
        raise AssertionError("the download never finished")


@pytest.mark.parametrize("kind", ["EPS", "GIF", "TIFF", "BMP"])
def test_only_png_jpeg_and_webp_are_decoded(tmp_path, kind):
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n" if kind == "EPS" else None
    if data is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, kind)
        data = buf.getvalue()
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "c.img").write_bytes(data)
    store = ControlImageStore(tmp_path / "store", allowed_roots=[tmp_path / "inbox"])
    with pytest.raises(ControlImageError, match="not an image .PNG, JPEG or WebP"):
        store.resolve("c.img", tmp_path / "inbox", "f")


def test_a_fifo_or_a_device_link_never_blocks_or_floods(tmp_path):
    (tmp_path / "inbox").mkdir()
    os.mkfifo(tmp_path / "inbox" / "fifo.png")
    (tmp_path / "inbox" / "zero.png").symlink_to("/dev/zero")
    store = ControlImageStore(tmp_path / "store", allowed_roots=[tmp_path / "inbox", Path("/dev")])
    with pytest.raises(ControlImageError, match="a FIFO, not a regular file"):
        store.resolve("fifo.png", tmp_path / "inbox", "f")
    with pytest.raises(ControlImageError, match="a device, not a regular file"):
        store.resolve("zero.png", tmp_path / "inbox", "f")
