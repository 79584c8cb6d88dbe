"""Confinement of the paths a dropped file names to the configured roots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
"""Weights in these formats are never opened: unpickling runs arbitrary code."""


def resolve_path(raw: str, base_dir: Path) -> Path:
    """`raw` with `~` expanded, relative to `base_dir`, symlinks resolved (so links cannot escape)."""
    return (base_dir / Path(raw).expanduser()).resolve()


def within(path: Path, roots: Sequence[Path]) -> bool:
    """True when the resolved `path` is one of `roots` or below one of them."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def outside_roots_message(path: Path, roots: Sequence[Path]) -> str:
    listed = ", ".join(str(Path(r).resolve()) for r in roots) or "(none configured)"
    return (f"{path} is outside the allowed roots ({listed}); "
            f"add its folder to `allowed_roots` in the config to allow it")


def is_url(source: str) -> bool:
    return source[:8].lower().startswith(("http://", "https://"))
