import base64
import hashlib
import http.server
import io
import threading

import pytest
from PIL import Image

from previewd.errors import ControlImageError
from previewd.intake.images import ControlImageStore


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
    with pytest.raises(ControlImageError, match="too large: .* bytes"):
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

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/c.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", body
    httpd.shutdown()
    httpd.server_close()


def test_url(tmp_path, server):
    base, body = server
    store = ControlImageStore(tmp_path / "store", allowed_roots=[], url_timeout=5)
    assert store.resolve(f"{base}/c.png", tmp_path, "f").sha256 == hashlib.sha256(body).hexdigest()
    with pytest.raises(ControlImageError, match="URL failed: .*HTTP 404"):
        store.resolve(f"{base}/nope.png", tmp_path, "f")
    with pytest.raises(ControlImageError, match="too large"):
        ControlImageStore(tmp_path / "s", allowed_roots=[], max_bytes=10).resolve(f"{base}/c.png", tmp_path, "f")
    with pytest.raises(ControlImageError, match="URLs are disabled"):
        ControlImageStore(tmp_path / "s", allowed_roots=[], allow_urls=False).resolve(f"{base}/c.png", tmp_path, "f")
