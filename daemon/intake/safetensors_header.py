"""Read a safetensors header without loading tensors (aitk-sampling.md §A.5).

ai-toolkit writes checkpoints in place, so a file can be seen half-written: its size tells.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

# safetensors itself refuses headers above 100 MB; a larger length means garbage, not a header.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsHeaderError(ValueError):
    """The file is not a readable safetensors file."""


class TruncatedSafetensors(SafetensorsHeaderError):
    """The file is shorter than its header says: still being written, or cut off."""


class CorruptSafetensors(SafetensorsHeaderError):
    """The file can never become a valid safetensors file."""


def _read_raw(path: Path) -> tuple[dict[str, Any], int, int]:
    """(header, header length, file size)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TruncatedSafetensors(f"{path}: {size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise CorruptSafetensors(f"{path}: header length {length} is not plausible (not a safetensors file?)")
        if size < 8 + length:
            raise TruncatedSafetensors(f"{path}: header says {length} bytes but the file has {size - 8} after the length")
        blob = f.read(length)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptSafetensors(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptSafetensors(f"{path}: header is a JSON {type(header).__name__}, not an object")
    return header, length, size


def _data_end(path: Path, header: dict[str, Any]) -> int:
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CorruptSafetensors(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        end = max(end, offsets[1])
    return end


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries, `__metadata__`) of a safetensors file; raises `SafetensorsHeaderError`.

    Only the header is checked here; use `is_complete` to know whether the data is all there.
    """
    path = Path(path)
    header, _, _ = _read_raw(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptSafetensors(f"{path}: __metadata__ is not an object")
    _data_end(path, header)
    return header, metadata


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True when size == 8 + header length + end of the last tensor.

    False while the file is still short (being written); raises `CorruptSafetensors` when it can
    never become valid (bad header, or more bytes than the header accounts for).
    """
    path = Path(path)
    try:
        header, length, size = _read_raw(path)
    except TruncatedSafetensors:
        return False
    expected = 8 + length + _data_end(path, header)
    if size > expected:
        raise CorruptSafetensors(f"{path}: {size} bytes but the header accounts for {expected}")
    return size == expected
