"""previewd's own copies of accepted checkpoints.

ai-toolkit deletes old checkpoints (max_step_saves_to_keep), so a queued render must not depend
on the training folder: each accepted file is hard-linked (or copied, across filesystems) into
state_dir, named by its content hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot(source: Path, snapshot_dir: Path) -> tuple[Path, str]:
    """Keep a stable copy of `source`; returns (snapshot path, sha256 of its content).

    The link is made before hashing, so the content we hash is the content we keep even if the
    trainer deletes or rewrites the original meanwhile.
    """
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=snapshot_dir, prefix=".incoming-", suffix=source.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        digest = sha256_file(tmp)
        final = snapshot_dir / f"{digest}{source.suffix}"
        if final.exists():
            tmp.unlink()
        else:
            os.replace(tmp, final)
        return final, digest
    finally:
        if tmp.exists():
            tmp.unlink()


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
        if now - path.stat().st_ctime < min_age_seconds:  # ctime: a hard link keeps the old mtime
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
