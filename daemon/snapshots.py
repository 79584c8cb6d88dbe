"""previewd's own copies of accepted checkpoints.

ai-toolkit deletes old checkpoints (max_step_saves_to_keep), so a queued render must not depend
on the training folder: each accepted file is copied into state_dir, named by its content hash.
A copy, not a hard link: safetensors rewrites a file in place when a name is saved again (a
resumed run), which would change a linked snapshot under its hash. The copy goes through
copy_file_range, a reflink on copy-on-write filesystems; the source is opened as every dropped
file is (previewd.safe_files), and what is kept is checked again: complete as its header says,
every tensor finite. A sparse file never gets this far (intake refuses it), so a snapshot costs
no more than the checkpoint occupies.

Every start delivers every checkpoint in the watched folders again, and their jobs are mostly done
(their snapshots pruned). So each snapshot is remembered by the identity of the file it was made
from (path, device, inode, size, mtime and ctime: a rewrite changes the ctime, which no one can
set back): `recall` gives the content hash without reading the file, and the copy is made again
only when a job not yet queued needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path

from previewd.config import LimitsConfig
from previewd.intake.safetensors_header import CorruptSafetensors, inspect, nonfinite_tensors
from previewd.safe_files import Roots, SafeDir, open_regular

_CHUNK = 1 << 20
SOURCES = ".sources"
"""Below the snapshot folder: one small file per checkpoint file snapshotted, holding its hash."""
_SOURCE_DAYS = 90
_DIGEST = re.compile(r"[0-9a-f]{64}")


def _source_key(source: Path, st: os.stat_result) -> str:
    identity = (f"{os.path.realpath(source)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
                f"\0{st.st_ctime_ns}")
    return hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def recall(source: Path, snapshot_dir: Path) -> tuple[Path, str] | None:
    """(snapshot path, sha256) of a checkpoint file snapshotted before and unchanged since, without
    reading it; None when unknown. The snapshot itself may have been pruned since."""
    try:
        st = os.stat(source)
        if not stat.S_ISREG(st.st_mode):
            return None
        memo = snapshot_dir / SOURCES / _source_key(source, st)
        digest = memo.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not _DIGEST.fullmatch(digest):
        return None
    snap = snapshot_dir / f"{digest}{source.suffix}"
    for used in (memo, snap):  # still in use: not old enough to prune, as snapshot() does
        with contextlib.suppress(OSError):  # the snapshot pruned; another host's file in a shared state_dir
            os.utime(used)
    return snap, digest


def _remember(source: Path, st: os.stat_result, snapshot_dir: Path, digest: str) -> None:
    with SafeDir.open(snapshot_dir / SOURCES) as folder:
        folder.write(_source_key(source, st), f"{digest}\n".encode())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy(source: int, target: int, size: int) -> None:
    """Copy `size` bytes between descriptors: copy_file_range (in the kernel, a reflink where the
    filesystem can), else a plain read/write loop."""
    done = 0
    try:
        while done < size:
            copied = os.copy_file_range(source, target, size - done)
            if copied == 0:
                break
            done += copied
    except OSError:  # e.g. EXDEV on older kernels, or a filesystem without it
        os.lseek(source, done, os.SEEK_SET)
        os.lseek(target, done, os.SEEK_SET)
        with os.fdopen(os.dup(source), "rb") as reader, os.fdopen(os.dup(target), "wb") as writer:
            shutil.copyfileobj(reader, writer, _CHUNK)
            writer.flush()


def snapshot(source: Path, snapshot_dir: Path, *, roots: Roots | None = None,
             limits: LimitsConfig = LimitsConfig()) -> tuple[Path, str]:
    """Keep a stable copy of the checkpoint `source`; returns (snapshot path, sha256 of its content).

    The copy is made before it is checked and hashed, so the content we check and hash is the
    content we keep even if the trainer deletes or rewrites the original meanwhile. Raises
    SafetensorsHeaderError for a copy previewd will not keep (incomplete, non-finite weights),
    RefusedFile or OSError for a source it cannot read.
    """
    expected = inspect(source, roots=roots, limits=limits)
    if not expected.complete:
        raise CorruptSafetensors(f"{expected.size} bytes but the header accounts for {expected.expected_size}")
    with SafeDir.open(snapshot_dir) as folder, folder.staged(source.name) as (tmp, handle):
        with open_regular(source, roots, max_bytes=limits.nbytes("checkpoint_gb")) as reader:
            before = os.fstat(reader.fileno())
            _copy(reader.fileno(), handle.fileno(), expected.size)
            after = os.fstat(reader.fileno())
        handle.flush()
        kept = snapshot_dir / tmp
        copied = inspect(kept, limits=limits)
        if not copied.complete or copied.expected_size != expected.expected_size:
            raise CorruptSafetensors("changed while it was copied; read again once it is written")
        bad = nonfinite_tensors(kept, copied)
        if bad:
            raise CorruptSafetensors(f"{len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0][:80]!r}); "
                                     f"the render would be black")
        digest = sha256_file(kept)
        final = f"{digest}{source.suffix}"
        if folder.stat(final) is not None:
            os.utime(final, dir_fd=folder.fd)  # newly needed again: not old enough to prune
        else:
            folder.replace(tmp, final)
    if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (after.st_size, after.st_mtime_ns,
                                                                    after.st_ctime_ns):
        _remember(source, after, snapshot_dir, digest)
    return snapshot_dir / final, digest


def prune(snapshot_dir: Path, keep: set[str], *, min_age_seconds: float, now: float) -> list[Path]:
    """Delete snapshots whose hash is not in `keep` (no unfinished job needs them any more).

    Young files are kept: intake snapshots a file a moment before its jobs are enqueued.
    """
    removed = []
    if not snapshot_dir.is_dir():
        return removed
    memos = snapshot_dir / SOURCES
    for memo in memos.iterdir() if memos.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # another worker sharing state_dir was first
            if now - memo.stat().st_mtime > _SOURCE_DAYS * 86400:
                memo.unlink()
    for path in snapshot_dir.iterdir():
        if path.name.startswith(".") or path.stem in keep:
            continue
        try:
            if now - path.stat().st_ctime < min_age_seconds:
                continue
        except FileNotFoundError:  # another worker sharing state_dir pruned it first
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
