"""Where model files are: a local folder, or a hub id already in the user's Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

from previewd.errors import ConfigError


def resolve_source(path: str) -> Path:
    """A local folder, or a hub id resolved through the user's HF cache without any download."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except Exception as exc:
        raise ConfigError(f"model source {path!r} is neither a folder nor a hub id in the local HF cache "
                          f"(previewd never downloads weights): {exc}") from exc
