"""Control images: local path, http(s) URL or base64, snapshotted content-addressed.

Queued renders must not depend on the source (a URL can change, a dataset file can be edited),
so every image is copied into the store under its sha256 before a spec names it. Local files are
read as every dropped file is (previewd.safe_files: regular files within the roots, size-capped),
URLs through the policy of previewd.intake.urls, and only PNG, JPEG and WebP are decoded: Pillow
would hand EPS and PostScript to Ghostscript.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from previewd.errors import ControlImageError
from previewd.fileio import atomic_write
from previewd.intake.paths import is_url, outside_roots_message, resolve_path, within
from previewd.intake.urls import UrlFetcher, UrlRefused
from previewd.safe_files import RefusedFile, read_regular

_DATA_URI = re.compile(r"^data:([^;,]*)(;[^,]*)?,", re.IGNORECASE)
_BASE64 = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")
# Shorter strings are treated as paths: no real image encodes to fewer than 64 base64 characters.
_MIN_BASE64 = 64
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""What Pillow may decode of a dropped file; never EPS/PS (Ghostscript) or the rarer plugins."""


@dataclass(frozen=True)
class StoredImage:
    """A verified image in the store."""

    path: str
    sha256: str
    width: int
    height: int


class ControlImageStore:
    def __init__(self, store_dir: Path, *, allowed_roots: list[Path], max_bytes: int = 20 * 1024 * 1024,
                 max_pixels: int = 50_000_000, fetcher: UrlFetcher | None = None, wait_for_urls: bool = True,
                 trusted: bool = False):
        """`trusted` lifts the confinement of local paths (`previewd render`: the user names them).
        `fetcher` None refuses URLs; `wait_for_urls` False raises UrlPending while one downloads."""
        self.store_dir = Path(store_dir)
        self.allowed_roots = [Path(r) for r in allowed_roots]
        self.max_bytes = max_bytes
        self.max_pixels = int(max_pixels)
        self.fetcher = fetcher
        self.wait_for_urls = wait_for_urls
        self.trusted = trusted

    def resolve(self, source: str, base_dir: Path, field: str) -> StoredImage:
        """Load, verify and store `source`; raises ControlImageError("<field>: <reason>")."""
        image, data = self.fetch(source, base_dir, field)
        self.keep(image, data)
        return image

    def fetch(self, source: str, base_dir: Path, field: str) -> tuple[StoredImage, bytes]:
        """Load and verify `source` without writing anything; the StoredImage names the path that
        `keep` gives it. Raises ControlImageError("<field>: <reason>")."""
        try:
            data = self._fetch(source.strip(), Path(base_dir))
            ext, width, height = self._verify(data)
        except _Rejected as exc:
            raise ControlImageError(f"{field}: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        return StoredImage(path=str(self.store_dir / f"{digest}.{ext}"), sha256=digest, width=width,
                           height=height), data

    def keep(self, image: StoredImage, data: bytes) -> None:
        """Write a fetched image to its content-addressed place (once)."""
        if not Path(image.path).exists():
            atomic_write(Path(image.path), data)

    def _fetch(self, source: str, base_dir: Path) -> bytes:
        if not source:
            raise _Rejected("empty value")
        if is_url(source):
            return self._download(source)
        match = _DATA_URI.match(source)
        if match:
            if not (match.group(2) or "").lower().endswith("base64"):
                raise _Rejected("data URI is not base64-encoded (expected data:image/...;base64,...)")
            return self._decode_base64(source[match.end():])
        if len(source) >= _MIN_BASE64 and _BASE64.match(source):
            try:
                exists = len(source) < 4096 and resolve_path(source, base_dir).exists()
            except OSError:  # e.g. a name longer than the filesystem allows: base64 then
                exists = False
            if not exists:
                return self._decode_base64(source)
        try:
            return self._read_local(source, base_dir)
        except OSError as exc:
            raise _Rejected(f"unreadable: {exc.strerror or exc}") from None

    def _read_local(self, source: str, base_dir: Path) -> bytes:
        path = resolve_path(source, base_dir)
        if not self.trusted and not within(path, self.allowed_roots):
            raise _Rejected(outside_roots_message(path, self.allowed_roots))
        if not path.exists():
            raise _Rejected(f"file not found: {path}")
        try:
            return read_regular(path, None if self.trusted else self.allowed_roots, max_bytes=self.max_bytes,
                                limit="limits.image_mb")
        except RefusedFile as exc:
            raise _Rejected(f"{path}: {exc.reason}") from None
        except OSError as exc:
            raise _Rejected(f"unreadable: {path}: {exc.strerror or exc}") from None

    def _download(self, url: str) -> bytes:
        if self.fetcher is None:
            raise _Rejected("could not fetch the URL: refused by policy (URLs are off: list the host in "
                            "urls.allow_hosts to allow it)")
        try:
            return self.fetcher.get(url, wait=self.wait_for_urls)
        except UrlRefused as exc:
            raise _Rejected(str(exc)) from None

    def _decode_base64(self, text: str) -> bytes:
        text = "".join(text.split())
        # Reject before decoding what would exceed the limit anyway (4 chars -> 3 bytes).
        if len(text) * 3 // 4 > self.max_bytes:
            raise _Rejected(f"too large: base64 data decodes to more than {self.max_bytes} bytes")
        try:
            if "-" in text or "_" in text:
                return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise _Rejected("neither an existing file, a URL nor valid base64 image data") from None

    def _verify(self, data: bytes) -> tuple[str, int, int]:
        """(extension, width, height) of a fully decodable image within the limits."""
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                    fmt, (width, height) = im.format, im.size
                    if width * height > self.max_pixels:
                        raise _Rejected(f"too large: {width}x{height} pixels (limit {self.max_pixels})")
                    im.verify()
                # verify() leaves the image unusable and misses truncated pixel data: decode it fully.
                with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                    im.load()
            except _Rejected:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise _Rejected("too large: decompression bomb rejected by Pillow") from None
            except UnidentifiedImageError:
                raise _Rejected("not an image (PNG, JPEG or WebP)") from None
            except (OSError, SyntaxError, ValueError) as exc:
                raise _Rejected(f"not an image: corrupt or truncated data ({exc})") from None
        ext = {"JPEG": "jpg", "MPO": "jpg"}.get(fmt or "", (fmt or "img").lower())
        return ext, width, height

class _Rejected(Exception):
    """Internal: the reason an image was refused, before the field name is attached."""
