"""previewd's own copies of accepted checkpoints.

ai-toolkit deletes old checkpoints (max_step_saves_to_keep), so a queued render must not depend
on the training folder: each accepted file is copied into state_dir, named by its content hash.
A copy, not a hard link: safetensors rewrites a file in place when a name is saved again (a
resumed run), which would change a linked snapshot under its hash. LoRA files are small, and
on copy-on-write filesystems the kernel's copy_file_range makes the copy a reflink.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from previewd.fileio import staged_copy

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot(source: Path, snapshot_dir: Path) -> tuple[Path, str]:
    """Keep a stable copy of `source`; returns (snapshot path, sha256 of its content).

    The copy is made before hashing, so the content we hash is the content we keep even if the
    trainer deletes or rewrites the original meanwhile.
    """
    with staged_copy(source, snapshot_dir) as tmp:
        digest = sha256_file(tmp)
        final = snapshot_dir / f"{digest}{source.suffix}"
        if final.exists():
            os.utime(final)  # newly needed again: not old enough to prune
        else:
            os.replace(tmp, final)
    return final, digest


def prune(snapshot_dir: Path, keep: set[str], *, min_age_seconds: float, now: float) -> list[Path]:
    """Delete snapshots whose hash is not in `keep` (no unfinished job needs them any more).

    Young files are kept: intake snapshots a file a moment before its jobs are enqueued.
    """
    removed = []
    if not snapshot_dir.is_dir():
        return removed
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
