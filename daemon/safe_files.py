"""The one place that opens what a dropped file leads to, and writes into output folders.

Anyone who can write into the inbox or a training folder can plant symbolic links (to secrets, to
devices), FIFOs, huge or sparse files and YAML that expands without bound (README: threat model).
So every read of a path that a dropped file names goes through `open_regular`, and every write
into an output folder through `SafeDir`:

- `open_regular`: the path is resolved and must lie within the roots; it must be a regular file;
  it is opened O_NOFOLLOW|O_NONBLOCK (a FIFO or a device never blocks, a link swapped in meanwhile
  is refused), the descriptor is checked again (the same inode, still within the roots by
  /proc/self/fd), and the size is capped before a byte is read.
- `read_text` + `parse_yaml`/`parse_json`: documents with limits on size, nesting depth and YAML
  alias expansion; errors in one short line.
- `SafeDir`: a folder created and opened without following links, whose files are written
  atomically and read relative to its descriptor (never through a link, never a FIFO); a folder
  swapped for a link is refused when it is opened again, and writes through a descriptor
  already open go into the folder that was opened, never where the link leads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from previewd.config import LimitsConfig
from previewd.errors import OutboxError, PreviewdError, shown

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


class RefusedFile(PreviewdError):
    """previewd will not open this file; the message is one short line without the file's content."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(reason)


def kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def why_unreadable(exc: OSError | UnicodeDecodeError) -> str:
    """Why a file could not be read, in one line without its path (the message is shown beside it)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    if exc.errno in (errno.EACCES, errno.EPERM):
        # The usual cause: safetensors 0.8 writes every file 0600, whatever the trainer's umask.
        return (f"permission denied to previewd's user ({_user_name()}); make the file readable to it, or run "
                "previewd as the user who writes it")
    return exc.strerror or type(exc).__name__


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry, as in some containers
        return f"uid {os.geteuid()}"


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{int(size)} bytes"


class Roots:
    """Folders whose files may be read (their real paths); None: anywhere (the user's own command)."""

    def __init__(self, roots: Sequence[str | os.PathLike[str]] | None):
        self.paths = None if roots is None else tuple(Path(os.path.realpath(r)) for r in roots)
        self.given = frozenset() if roots is None else frozenset(os.path.abspath(r) for r in roots)
        """The roots as configured: one of them may be a link (the admin's), a folder below one may not."""

    def within(self, real: str | os.PathLike[str]) -> bool:
        return self.paths is None or any(Path(real).is_relative_to(root) for root in self.paths)


def _roots(roots: Roots | Sequence[str | os.PathLike[str]] | None) -> Roots:
    return roots if isinstance(roots, Roots) else Roots(roots)


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the realpath check before the open stands alone
        return None


def open_regular(path: str | os.PathLike[str], roots: Roots | Sequence[str | os.PathLike[str]] | None = None, *,
                 max_bytes: int | None = None, limit: str | None = None) -> IO[bytes]:
    """`path` opened for reading, if it is a regular file within `roots` of at most `max_bytes`.

    Raises RefusedFile (a link out of the roots, a FIFO, a device, too large...) or OSError (gone,
    unreadable). `limit` names the config key of `max_bytes` in the message.
    """
    roots = _roots(roots)
    path = Path(path)
    real = os.path.realpath(path)
    if not roots.within(real):
        linked = real != os.path.abspath(path)
        raise RefusedFile(path, "a symbolic link that leads out of the watched and allowed folders; not followed"
                          if linked else "outside the watched and allowed folders")
    try:
        before = os.lstat(real)
    except FileNotFoundError:
        if real != os.path.abspath(path) and os.path.lexists(path):
            raise RefusedFile(path, "a symbolic link that leads nowhere") from None
        raise
    if not stat.S_ISREG(before.st_mode):
        raise RefusedFile(path, f"{kind(before.st_mode)}, not a regular file")
    if max_bytes is not None and before.st_size > max_bytes:
        raise RefusedFile(path, f"too large: {_mib(before.st_size)}; at most {_mib(max_bytes)}"
                                + (f" ({limit})" if limit else ""))
    try:
        fd = os.open(real, _READ)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedFile(path, "replaced by a symbolic link while being opened; not followed") from None
        raise
    try:
        after = os.fstat(fd)
        opened = _fd_path(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(after.st_mode):
            raise RefusedFile(path, "replaced while being opened")
        if opened is not None and not roots.within(opened):
            raise RefusedFile(path, "moved out of the watched and allowed folders while being opened")
        # Regular files never block; the flag only kept a FIFO swapped in from hanging the open.
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], roots: Roots | Sequence[str | os.PathLike[str]] | None = None, *,
                 max_bytes: int, limit: str | None = None) -> bytes:
    """The bytes of a regular file within `roots`, refused beyond `max_bytes` (also when it grows)."""
    with open_regular(path, roots, max_bytes=max_bytes, limit=limit) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RefusedFile(path, f"too large: more than {_mib(max_bytes)}" + (f" ({limit})" if limit else ""))
    return data


def read_text(path: str | os.PathLike[str], roots: Roots | Sequence[str | os.PathLike[str]] | None,
              limits: LimitsConfig) -> str:
    """A request or run config as text (UTF-8; UnicodeDecodeError otherwise)."""
    data = read_regular(path, roots, max_bytes=limits.nbytes("document_mb"), limit="limits.document_mb")
    return data.decode("utf-8")


# -- documents ---------------------------------------------------------------------------------

class DocumentLimit(yaml.YAMLError):
    """A document beyond the limits (too many values, too deep, aliases expanding too far, recursive)."""


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml where PyYAML has it: pure-Python parsing of a 16 MiB document would take many seconds."""


def _check_events(text: str, limits: LimitsConfig) -> None:
    """Refuse a document with more than `document_nodes` nodes or nested deeper than `max_depth`
    (aliases expanded), whose aliases would add more than `yaml_alias_nodes` nodes, or that refers
    to itself, from the parser's event stream alone: nothing is composed, and the composer (which
    recurses) only ever sees a document within the limits. An alias repeats its anchor's whole
    subtree, so each anchor's expanded size and depth (in collections) are kept as its node ends."""
    anchors: dict[str, tuple[int, int]] = {}
    frames: list[list] = [[None, 0, 0]]  # [anchor, nodes so far, deepest child], the root frame first
    added = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchors:
                if any(frame[0] == event.anchor for frame in frames):
                    raise DocumentLimit("an alias refers to the collection that holds it (a recursive document)")
                continue  # an undefined alias: the parse proper says so
            size, depth = anchors[event.anchor]
            added += size
            if added > limits.yaml_alias_nodes:
                raise DocumentLimit(f"aliases expand it by more than {limits.yaml_alias_nodes} nodes "
                                    f"(limits.yaml_alias_nodes)")
            if depth + len(frames) - 1 > limits.max_depth:
                raise DocumentLimit(f"nested deeper than {limits.max_depth} levels once aliases are expanded "
                                    f"(limits.max_depth)")
        elif isinstance(event, yaml.ScalarEvent):
            size, depth = 1, 0
            if event.anchor is not None:
                anchors[event.anchor] = (size, depth)
        elif isinstance(event, yaml.CollectionStartEvent):
            frames.append([event.anchor, 1, 0])
            if len(frames) - 1 > limits.max_depth:
                raise DocumentLimit(f"nested deeper than {limits.max_depth} levels (limits.max_depth)")
            continue
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size, deepest = frames.pop()
            depth = deepest + 1
            if anchor is not None:
                anchors[anchor] = (size, depth)
        else:
            continue
        frames[-1][1] += size
        frames[-1][2] = max(frames[-1][2], depth)
        if frames[0][1] + sum(frame[1] for frame in frames[1:]) > limits.document_nodes:
            raise DocumentLimit(f"more than {limits.document_nodes} values (limits.document_nodes)")


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's message without the quoted source lines: the place and the problem."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return where + " ".join(str(exc.problem or exc.context or "invalid YAML").split())
    return " ".join(str(exc).split())


def parse_yaml(text: str, limits: LimitsConfig) -> Any:
    """YAML (safe types only) within the limits; raises yaml.YAMLError with a one-line message."""
    try:
        _check_events(text, limits)
        return yaml.load(text, Loader=_Loader)
    except DocumentLimit:
        raise
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own limit (1000) may meet a document first
            raise DocumentLimit(f"nested deeper than {limits.max_depth} levels (limits.max_depth)") from None
        raise yaml.YAMLError(_one_line(exc)) from None


def parse_json(text: str, limits: LimitsConfig) -> Any:
    """JSON within the nesting limit; raises json.JSONDecodeError or DocumentLimit."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise DocumentLimit(f"nested deeper than {limits.max_depth} levels (limits.max_depth)") from None
    stack, nodes = [(data, 0)], 0
    while stack:
        value, level = stack.pop()
        nodes += 1
        if nodes > limits.document_nodes:
            raise DocumentLimit(f"more than {limits.document_nodes} values (limits.document_nodes)")
        if isinstance(value, (dict, list)):
            if level + 1 > limits.max_depth:
                raise DocumentLimit(f"nested deeper than {limits.max_depth} levels (limits.max_depth)")
            children = list(value.values()) + list(value) if isinstance(value, dict) else value
            stack += [(v, level + 1) for v in children]
    return data


# -- output folders ------------------------------------------------------------------------------

_output_roots = Roots(None)


def confine_outputs(roots: Sequence[str | os.PathLike[str]] | None) -> None:
    """The folders below which this process writes previews and error files (the daemon: the watched,
    allowed and output folders); None: anywhere (`previewd render`, whose user names the folder)."""
    global _output_roots
    _output_roots = Roots(roots)


def output_roots() -> Roots:
    return _output_roots


class UnsafeFolder(OutboxError):
    """An output folder previewd will not write into (a link, replaced, out of the roots)."""


def _valid_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafeFolder(f"{name!r} is not a plain file name")
    return name


class SafeDir:
    """A folder opened without following links; everything in it goes through its descriptor.

    `open` resolves the deepest folder of the path that exists, which must lie within the roots
    and, unless it is a root as configured, must not itself be a link; the missing folders below it
    are created and entered O_NOFOLLOW.
    """

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str], roots: Roots | Sequence[str | os.PathLike[str]] | None = None, *,
             create: bool = True) -> SafeDir:
        roots = _roots(roots)
        path = Path(os.path.abspath(path))
        missing: list[str] = []
        base = path
        while not os.path.lexists(base) and base != base.parent:
            missing.append(base.name)
            base = base.parent
        if missing and not create:
            raise FileNotFoundError(errno.ENOENT, "no such folder", str(path))
        if roots.paths is not None and os.path.islink(base) and str(base) not in roots.given:
            raise UnsafeFolder(f"{shown(base)}: a symbolic link; previewd does not write through it")
        real = os.path.realpath(base)
        if not roots.within(real):
            raise UnsafeFolder(f"{shown(path)}: leads out of the watched, allowed and output folders")
        fd = os.open(real, _DIR)
        try:
            opened = _fd_path(fd)
            if opened is not None and not roots.within(opened):
                raise UnsafeFolder(f"{shown(path)}: moved out of the allowed folders while being opened")
            for name in reversed(missing):
                parent, fd = fd, -1  # _enter closes the parent, whatever happens
                fd = _enter(parent, name, create=create, shown_path=path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return cls(fd, path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def stat(self, name: str) -> os.stat_result | None:
        """lstat of an entry; None when there is none."""
        try:
            return os.stat(_valid_name(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read(self, name: str, max_bytes: int) -> bytes:
        """A regular file of the folder (never through a link, never a FIFO), at most `max_bytes`."""
        with self.open_file(name) as handle:
            if os.fstat(handle.fileno()).st_size > max_bytes:
                raise UnsafeFolder(f"{shown(self.path / name)}: larger than {_mib(max_bytes)}")
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise UnsafeFolder(f"{shown(self.path / name)}: larger than {_mib(max_bytes)}")
        return data

    def open_file(self, name: str) -> IO[bytes]:
        """A regular file of the folder opened for reading, never through a link, never a FIFO."""
        try:
            fd = os.open(_valid_name(name), _READ, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFolder(f"{shown(self.path / name)}: a symbolic link; not followed") from None
            raise
        os.set_blocking(self._regular(fd, name), True)
        return os.fdopen(fd, "rb")

    def write(self, name: str, data: bytes) -> None:
        """Write `name` atomically: a temporary file created here (O_EXCL|O_NOFOLLOW), fsynced,
        renamed over the name, so a link planted at the name is replaced, never followed."""
        with self.staged(name) as (tmp, handle):
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            self.replace(tmp, name)

    @contextlib.contextmanager
    def staged(self, name: str) -> Iterator[tuple[str, IO[bytes]]]:
        """A new hidden temporary file here for the caller to fill and `replace` into place;
        removed if it is still there afterwards. Created 0666 less the umask, as open() would."""
        _valid_name(name)
        while True:
            tmp = f".{name[:200]}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                             dir_fd=self.fd)
            except FileExistsError:
                continue
            break
        try:
            with os.fdopen(fd, "wb") as handle:
                yield tmp, handle
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=self.fd)

    def replace(self, source: str, target: str) -> None:
        os.replace(_valid_name(source), _valid_name(target), src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def touch(self, name: str) -> None:
        """Create `name` as an empty regular file unless it is one already; refuse anything else."""
        os.close(self._open_lock_file(name))

    def _open_lock_file(self, name: str) -> int:
        try:
            fd = os.open(_valid_name(name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o666, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise UnsafeFolder(f"{shown(self.path / name)}: not a regular file; not used") from None
            raise
        return self._regular(fd, name, "; not used")

    def _regular(self, fd: int, name: str, note: str = "") -> int:
        """`fd` if it is a regular file; else closed, and refused."""
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise UnsafeFolder(f"{shown(self.path / name)}: {kind(mode)}, not a regular file{note}")
        return fd

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[None]:
        """An exclusive flock on the regular file `name`, waited for at most `timeout` seconds."""
        fd = self._open_lock_file(name)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise UnsafeFolder(f"{shown(self.path / name)}: still locked by another process after "
                                           f"{timeout:.0f}s") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _enter(parent_fd: int, name: str, *, create: bool, shown_path: Path) -> int:
    """Open `name` below `parent_fd` as a folder without following a link (created if missing);
    closes `parent_fd` and returns the new descriptor."""
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o777, dir_fd=parent_fd)
        try:
            return os.open(name, _DIR, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeFolder(f"{shown(shown_path)}: not a folder (a symbolic link or a file); "
                                   f"previewd writes only into folders it can enter without following links") from None
            raise
    finally:
        os.close(parent_fd)
