"""Control-image sources of one input file → ControlImages, each source resolved once."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from previewd.errors import ControlImageError
from previewd.spec import ControlImage


class ResolvedImage(Protocol):
    path: Any
    sha256: str | None


ResolveImage = Callable[[str, Path, str], ResolvedImage]
"""resolve_image(source, base_dir, field): materialise a path/URL/base64 source or raise ControlImageError."""


class ControlResolver:
    """Resolves the control images of one file; a source named by several prompts is fetched once."""

    def __init__(self, resolve_image: ResolveImage, base_dir: Path):
        self._resolve_image = resolve_image
        self._base_dir = base_dir
        self._seen: dict[str, ControlImage | str] = {}

    def resolve(self, where: str, sources: Iterable[tuple[str, str | None]]) -> tuple[list[ControlImage], list[str]]:
        """(slot, source) pairs → (control images in order, "where.slot: reason" problems)."""
        controls, problems = [], []
        for slot, source in sources:
            if source is None:
                continue
            if source not in self._seen:
                field = f"{where}.{slot}"
                try:
                    image = self._resolve_image(source, self._base_dir, field)
                    self._seen[source] = ControlImage(slot="ctrl_img", path=str(image.path), sha256=image.sha256)
                except ControlImageError as exc:
                    self._seen[source] = str(exc).removeprefix(f"{field}: ")
            got = self._seen[source]
            if isinstance(got, str):
                problems.append(f"{where}.{slot}: {got}")
            else:
                controls.append(got.model_copy(update={"slot": slot}))
        return controls, problems
