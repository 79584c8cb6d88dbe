"""Where model files are: a local folder, or a hub id already in the user's Hugging Face cache.

Torch-free, so `previewd doctor` and the worker can check a source before anything loads.
previewd never downloads: a missing model is a permanent error that says what to fetch.
"""

from __future__ import annotations

from pathlib import Path

from previewd.errors import ModelNotFound
from previewd.spec import ModelSource

INDEX = "model_index.json"
"""A diffusers pipeline folder has it; a transformers model folder (a separate text encoder) has config.json."""


def _looks_like_a_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


def resolve_source(path: str) -> Path:
    """The folder holding `path`'s files: a local folder, or the snapshot of a hub id in the local
    HF cache (HF_HOME / HF_HUB_CACHE honoured). Raises ModelNotFound saying where it looked."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if not _looks_like_a_hub_id(path):
        raise ModelNotFound(f"{path}: no such folder")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelNotFound(f"{path}: not in the Hugging Face cache at {constants.HF_HUB_CACHE} "
                            f"(previewd never downloads; fetch it with `hf download {path}`, or set HF_HOME "
                            "to the cache ai-toolkit uses)") from None


def check_layout(root: Path, components: tuple[str, ...]) -> list[str]:
    """What a diffusers-layout folder lacks for these components (weights as safetensors only)."""
    missing = []
    if not (root / INDEX).is_file():
        missing.append(INDEX)
    for component in components:
        folder = root / component
        if not folder.is_dir():
            missing.append(f"{component}/")
        elif not any(folder.glob("*.safetensors")):
            missing.append(f"{component}/*.safetensors")
    return missing


def verify_source(model_id: str, source: ModelSource) -> Path:
    """Check, without loading, that `source` holds a complete model for `model_id`; returns its
    folder. Raises ModelNotFound with one line naming the id, where it looked and what is missing."""
    try:
        root = resolve_source(source.path)
        components = ("transformer", "vae") if source.text_encoder else ("transformer", "vae", "text_encoder")
        missing = check_layout(root, components)
        if source.text_encoder:
            resolve_source(source.text_encoder)
    except ModelNotFound as exc:
        raise ModelNotFound(f"{model_id}: {exc}") from None
    if missing:
        raise ModelNotFound(f"{model_id}: {root} is not a complete diffusers model folder "
                            f"(missing {', '.join(missing)}; previewd loads safetensors only)")
    return root
