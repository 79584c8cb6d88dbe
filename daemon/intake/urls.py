"""Control images from http(s) URLs: under a policy, within limits, off the intake thread.

A URL in a dropped file is a request previewd would make on its author's behalf, from inside the
training machine's network. So: off unless `urls.allow_hosts` lists the host; http and https only;
the name is resolved once and every address must be public (no loopback, link-local, private,
multicast or reserved network), and the connection goes to that address, so a second lookup
cannot point elsewhere; a redirect may only stay on the same host; the whole download, connection
included, gets `urls.timeout_seconds` and `limits.image_mb`. Errors say "refused by policy" or
"failed", never what answered where: a dropped file must not become a port scanner.

Downloads run on a small pool: intake asks, gets `UrlPending`, and reads the file again once the
result is in (the watcher delivers a not-ready file again after its settle time).
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urljoin, urlsplit

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 3
_KEEP_SECONDS = 600.0
"""A result is reused this long (a run's config is read again for every checkpoint)."""
_KEEP_ENTRIES = 32
_CHUNK = 1 << 16


class UrlPending(Exception):
    """The URL is being fetched; ask again later."""


class UrlRefused(Exception):
    """The URL may not or could not be fetched; the message is safe to show."""


def public_address(address: str) -> bool:
    """An address on the public internet (IPv4-mapped IPv6 judged as the IPv4 address it maps)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_allowed(host: str, allow_hosts: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
               for pattern in allow_hosts)


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to one resolved address, whatever the host name resolves to later."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class UrlFetcher:
    def __init__(self, allow_hosts: tuple[str, ...], *, timeout: float, max_bytes: int, workers: int = 2,
                 address_allowed: Callable[[str], bool] = public_address):
        """`address_allowed` decides which resolved addresses may be connected to (tests pass one
        that admits 127.0.0.1; the daemon never does)."""
        self.allow_hosts = tuple(h.lower() for h in allow_hosts)
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._address_allowed = address_allowed
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="previewd-url")
        self._lock = threading.Lock()
        self._running: dict[str, Future] = {}
        self._done: OrderedDict[str, tuple[float, bytes | None, str]] = OrderedDict()

    def check(self, url: str) -> None:
        """Raise UrlRefused unless the policy allows fetching `url` at all (no network used)."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise UrlRefused("could not fetch the URL: not a valid URL") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise UrlRefused("could not fetch the URL: refused by policy (http and https only)")
        if not self.allow_hosts:
            raise UrlRefused("could not fetch the URL: refused by policy (URLs are off: list the host in "
                             "urls.allow_hosts to allow it)")
        if not host_allowed(parts.hostname, self.allow_hosts):
            raise UrlRefused("could not fetch the URL: refused by policy (its host is not in urls.allow_hosts)")

    def get(self, url: str, *, wait: bool = False) -> bytes:
        """The body of `url`; UrlRefused when it may not or could not be fetched; UrlPending while
        a download runs (unless `wait`)."""
        self.check(url)
        with self._lock:
            kept = self._done.get(url)
            if kept is not None and kept[0] > time.monotonic():
                return self._result(kept)
            future = self._running.get(url)
            if future is None:
                future = self._pool.submit(self._run, url)
                self._running[url] = future
        if not wait:
            raise UrlPending(url)
        return self._result(future.result())

    @staticmethod
    def _result(kept: tuple[float, bytes | None, str]) -> bytes:
        _expires, body, error = kept
        if body is None:
            raise UrlRefused(error)
        return body

    def _run(self, url: str) -> tuple[float, bytes | None, str]:
        try:
            body, error = self._download(url), ""
        except UrlRefused as exc:
            body, error = None, str(exc)
        except Exception:  # noqa: BLE001 - whatever broke, the file must hear "failed", not how
            log.debug("fetching %s failed", url, exc_info=True)
            body, error = None, "could not fetch the URL: failed"
        kept = (time.monotonic() + _KEEP_SECONDS, body, error)
        with self._lock:
            self._running.pop(url, None)
            self._done[url] = kept
            self._done.move_to_end(url)
            while len(self._done) > _KEEP_ENTRIES:
                self._done.popitem(last=False)
        return kept

    def _download(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        origin = urlsplit(url)
        for _hop in range(_MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if (parts.scheme.lower(), parts.hostname, parts.port) != (origin.scheme.lower(), origin.hostname,
                                                                      origin.port):
                raise UrlRefused("could not fetch the URL: refused by policy (a redirect to another host)")
            status, location, body = self._request(parts, deadline)
            if location is None:
                if status != 200:
                    raise UrlRefused(f"could not fetch the URL: failed (HTTP {status})")
                return body
            url = urljoin(url, location)
        raise UrlRefused("could not fetch the URL: failed (too many redirects)")

    def _request(self, parts, deadline: float) -> tuple[int, str | None, bytes]:
        tls = parts.scheme.lower() == "https"
        port = parts.port or (443 if tls else 80)
        try:
            infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError:
            raise UrlRefused("could not fetch the URL: failed") from None
        addresses = [info[4][0] for info in infos]
        if not addresses or not all(self._address_allowed(a) for a in addresses):
            log.debug("%s resolves to %s: not a public address", parts.hostname, addresses)
            raise UrlRefused("could not fetch the URL: refused by policy")
        remaining = deadline - time.monotonic()
        connection = (_PinnedTLS if tls else _Pinned)(parts.hostname, port, addresses[0], max(0.1, remaining))
        # The total time is enforced from outside: a server dribbling bytes never hits a per-read timeout.
        timer = threading.Timer(max(0.0, remaining), _abort, (connection,))
        timer.start()
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers={"User-Agent": "previewd", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                return response.status, response.getheader("Location") or "", b""
            if response.status != 200:
                return response.status, None, b""
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise UrlRefused(f"could not fetch the URL: larger than {self.max_bytes} bytes (limits.image_mb)")
            body = bytearray()
            while chunk := response.read1(_CHUNK):
                body += chunk
                if len(body) > self.max_bytes:
                    raise UrlRefused(f"could not fetch the URL: larger than {self.max_bytes} bytes "
                                     f"(limits.image_mb)")
                if time.monotonic() > deadline:
                    break
            if time.monotonic() > deadline:
                raise UrlRefused(f"could not fetch the URL: took longer than {self.timeout:g}s (urls.timeout_seconds)")
            return 200, None, bytes(body)
        except (OSError, http.client.HTTPException, ValueError):
            if time.monotonic() > deadline:
                raise UrlRefused(f"could not fetch the URL: took longer than {self.timeout:g}s "
                                 f"(urls.timeout_seconds)") from None
            raise UrlRefused("could not fetch the URL: failed") from None
        finally:
            timer.cancel()
            connection.close()


def _abort(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
