"""`previewd serve`: every output folder's page, read-only, over HTTP (the standard library's server).

URLs mirror the folders below the config's roots (`/<root number>/<path>`), so the relative links a
page holds — its images, thumbnails, manifest.js and ai-toolkit's `../samples/` beside a run's
previews — work as they do from file://. Only files inside an output folder (one holding the
outbox's lock file and a manifest), or inside the `samples/` folder of the run that holds one,
are served; everything else is "not found", symbolic links included once resolved. Anyone who can
drop files can plant a folder that looks like an output folder, so every file is opened as a dropped
one is (previewd.safe_files: a regular file, within that folder, never a FIFO, size-capped).
"""

from __future__ import annotations

import html
import json
import logging
import mimetypes
import os
import posixpath
import shutil
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from previewd.config import Config
from previewd.outbox import LOCK, MANIFEST, PAGE
from previewd.safe_files import RefusedFile, Roots, open_regular, read_regular

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
_RESCAN_SECONDS = 5.0
_SAMPLES = "samples"
_MAX_MANIFEST = 64 << 20
_MAX_FILE = 1 << 30
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The pages are self-contained; this keeps them so.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self' 'unsafe-inline'",
}


@dataclass(frozen=True)
class OutputFolder:
    root: int
    path: Path
    """Resolved."""
    url: str
    """`/<root>/<path below the root>/`."""


class Outboxes:
    """The output folders below the roots, found again every few seconds."""

    def __init__(self, roots: list[Path]):
        self.roots: list[Path] = []
        for root in roots:
            resolved = root.resolve()
            if resolved not in self.roots:
                self.roots.append(resolved)
        self._found: list[OutputFolder] = []
        self._found_at = float("-inf")

    def folders(self) -> list[OutputFolder]:
        if time.monotonic() - self._found_at > _RESCAN_SECONDS:
            self._found = self._scan()
            self._found_at = time.monotonic()
        return self._found

    def _scan(self) -> list[OutputFolder]:
        found: dict[Path, OutputFolder] = {}
        for number, root in enumerate(self.roots):
            for folder, dirs, files in os.walk(root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                if LOCK in files and MANIFEST in files:
                    path = Path(folder).resolve()
                    if path.is_relative_to(root) and path not in found:
                        below = path.relative_to(root).as_posix()
                        found[path] = OutputFolder(number, path, f"/{number}/{quote(below)}/" if below != "." else f"/{number}/")
        return sorted(found.values(), key=lambda f: f.url)

    def locate(self, url_path: str) -> tuple[Path, Roots] | None:
        """The file a URL names, if it may be served, and the folders it must stay within."""
        # `..` as a browser resolves it (a page's ../samples/); containment is checked once resolved.
        parts = [p for p in posixpath.normpath(url_path).split("/") if p]
        if not parts or not parts[0].isdigit() or int(parts[0]) >= len(self.roots):
            return None
        if any(p in ("..", ".") or "\x00" in p for p in parts):
            return None
        root = self.roots[int(parts[0])]
        try:
            path = root.joinpath(*parts[1:]).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        for folder in self.folders():
            if path.is_relative_to(folder.path) or path.is_relative_to(folder.path.parent / _SAMPLES):
                return path, Roots([folder.path, folder.path.parent / _SAMPLES])
        return None


def _summary(folder: OutputFolder) -> dict:
    try:
        data = json.loads(read_regular(folder.path / MANIFEST, [folder.path], max_bytes=_MAX_MANIFEST))
    except (OSError, ValueError, RefusedFile):
        data = {}
    if not isinstance(data, dict):
        data = {}
    return {"title": data.get("title") or folder.path.name, "model": data.get("model") or "",
            "updated": data.get("updated_at") or "", "done": len(data.get("renders") or []),
            "pending": len(data.get("pending") or []), "failed": len(data.get("failed") or [])}


def index_page(outboxes: Outboxes) -> bytes:
    rows = []
    for folder in outboxes.folders():
        s = _summary(folder)
        counts = f"{s['done']} done" + (f", {s['pending']} queued" if s["pending"] else "") + \
            (f", {s['failed']} failed" if s["failed"] else "")
        rows.append(f"<tr><td><a href='{html.escape(folder.url)}'>{html.escape(s['title'])}</a></td>"
                    f"<td>{html.escape(s['model'])}</td><td>{counts}</td><td>{html.escape(s['updated'][:19])}</td>"
                    f"<td class='path'>{html.escape(str(folder.path))}</td></tr>")
    body = "".join(rows) or "<tr><td colspan='5'>No previews yet.</td></tr>"
    return ("<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='15'>"
            "<title>previewd</title><style>body{font:14px system-ui,sans-serif;margin:1.5em}"
            "table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}"
            ".path{color:#777;font-size:12px}</style></head><body><h1>previewd</h1>"
            "<table><tr><th>run or request</th><th>model</th><th>renders</th><th>updated (UTC)</th><th>folder</th></tr>"
            f"{body}</table></body></html>").encode()


class Handler(BaseHTTPRequestHandler):
    outboxes: Outboxes
    server_version = "previewd"

    def do_HEAD(self) -> None:  # noqa: N802 - the standard library's name
        self._respond(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._respond(head=False)

    def _respond(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if path == "/":
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", index_page(self.outboxes), head)
            return
        located = self.outboxes.locate(path)
        if located is None:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", head)
            return
        target, within = located
        if target.is_dir():
            if not path.endswith("/"):
                self.send_response(HTTPStatus.MOVED_PERMANENTLY)
                self.send_header("Location", quote(path) + "/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            target = target / PAGE
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        try:
            handle = open_regular(target, within, max_bytes=_MAX_FILE)
        except (OSError, RefusedFile):
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", head)
            return
        with handle:
            self._headers(HTTPStatus.OK, kind, os.fstat(handle.fileno()).st_size)
            if not head:
                shutil.copyfileobj(handle, self.wfile)

    def _send(self, status: HTTPStatus, kind: str, body: bytes, head: bool) -> None:
        self._headers(status, kind, len(body))
        if not head:
            self.wfile.write(body)

    def _headers(self, status: HTTPStatus, kind: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(length))
        for name, value in _HEADERS.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the standard library's signature
        log.debug("%s %s", self.address_string(), format % args)


def roots(config: Config) -> list[Path]:
    """Where output folders can be: the outbox root, the watched folders (runs' previews) and the
    folders requests may name as their output."""
    return [config.outbox_root, *config.watch_roots, *config.allowed_roots]


def make_server(config: Config, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("PreviewHandler", (Handler,), {"outboxes": Outboxes(roots(config))})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
