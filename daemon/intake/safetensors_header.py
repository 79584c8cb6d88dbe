"""Read a safetensors header without loading tensors (aitk-sampling.md §A.5), and judge it.

ai-toolkit writes checkpoints in place, so a file can be seen half-written: its size tells. A
header is also a claim that must hold before previewd copies or queues anything: tensors laid out
back to back as safetensors itself requires, each exactly its dtype and shape long, within
`limits.checkpoint_gb`; a header within `limits.header_mb` and no more than 1 MiB beyond the data it
describes; a file that occupies its size on disk (not sparse). A LoRA must also hold only LoRA
weights, in pairs of matching shapes, all finite.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from previewd.config import LimitsConfig
from previewd.lora_keys import LORA_ALPHA, LORA_WEIGHT, UNSUPPORTED_TAGS
from previewd.safe_files import Roots, open_regular

DEFAULT_LIMITS = LimitsConfig()
_HEADER_SLACK = 1 << 20
"""A header may exceed the tensor data it describes by this much (tiny test LoRAs do)."""
_SPARSE_FROM = 16 << 20
"""Smaller files are not judged by their allocation (filesystems store small files inline)."""
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FLOAT_EXPONENTS = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
                    "BF16": ("<u2", 0x7F80)}
"""dtype -> (unsigned view, exponent mask): all exponent bits set means infinite or NaN."""
_LORA_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsHeaderError(ValueError):
    """The file is not a readable safetensors file."""


class TruncatedSafetensors(SafetensorsHeaderError):
    """The file is shorter than its header says: still being written, or cut off."""


class CorruptSafetensors(SafetensorsHeaderError):
    """The file can never become a valid safetensors file (or one previewd accepts)."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Header:
    tensors: dict[str, Any]
    metadata: dict[str, str]
    header_bytes: int
    data_bytes: int
    """Where the last tensor ends, after the header."""
    size: int
    mtime: float

    @property
    def expected_size(self) -> int:
        return 8 + self.header_bytes + self.data_bytes

    @property
    def complete(self) -> bool:
        return self.size == self.expected_size


def inspect(path: str | os.PathLike[str], *, roots: Roots | None = None,
            limits: LimitsConfig = DEFAULT_LIMITS) -> Header:
    """The header of `path`, checked. Raises TruncatedSafetensors while the header itself is not
    all there, CorruptSafetensors when the file can never be accepted, RefusedFile (not a regular
    file within the roots), OSError (gone).

    A file shorter than its tensors is returned with `complete` False; longer, it is corrupt.
    """
    path = Path(path)
    with open_regular(path, roots) as handle:
        info = os.fstat(handle.fileno())
        size = info.st_size
        if size > limits.nbytes("checkpoint_gb"):
            raise CorruptSafetensors(f"{_mib(size)}; at most {limits.checkpoint_gb:g} GiB (limits.checkpoint_gb)")
        if size >= _SPARSE_FROM and info.st_blocks * 512 < limits.checkpoint_min_allocated * size:
            raise CorruptSafetensors(f"a sparse file: {_mib(info.st_blocks * 512)} on disk for {_mib(size)} "
                                     f"(limits.checkpoint_min_allocated)")
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise TruncatedSafetensors(f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > limits.nbytes("header_mb"):
            raise CorruptSafetensors(f"header of {_mib(length)}; at most {limits.header_mb:g} MiB (limits.header_mb)")
        if size < 8 + length:
            raise TruncatedSafetensors(f"the header says {length} bytes but the file has {size - 8} after its length")
        blob = handle.read(length)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CorruptSafetensors("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CorruptSafetensors(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptSafetensors("__metadata__ is not an object of texts")
    end = _data_end(header, limits)
    if length > end + _HEADER_SLACK:
        raise CorruptSafetensors(f"a header of {_mib(length)} for {_mib(end)} of tensors (limits.header_mb)")
    found = Header(tensors=header, metadata=metadata, header_bytes=length, data_bytes=end, size=size,
                   mtime=info.st_mtime)
    if size > found.expected_size:
        raise CorruptSafetensors(f"{size} bytes but the header accounts for {found.expected_size}")
    return found


def _data_end(header: dict[str, Any], limits: LimitsConfig) -> int:
    """The end of the tensor data; each tensor exactly its dtype times its shape long, laid out
    back to back from 0 as safetensors requires."""
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise CorruptSafetensors(f"tensor {name[:80]!r} is not described by an object")
        offsets, dtype, shape = entry.get("data_offsets"), entry.get("dtype"), entry.get("shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CorruptSafetensors(f"tensor {name[:80]!r} has invalid data_offsets")
        if dtype not in DTYPE_BYTES:
            raise CorruptSafetensors(f"tensor {name[:80]!r} has an unknown dtype")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CorruptSafetensors(f"tensor {name[:80]!r} has an invalid shape")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CorruptSafetensors(f"tensor {name[:80]!r}: its data_offsets do not match its dtype and shape")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CorruptSafetensors(f"tensor {name[:80]!r} does not start where the previous one ends")
        end = stop
    if end > limits.nbytes("checkpoint_gb"):
        raise CorruptSafetensors(f"the header claims {_mib(end)} of tensors; at most {limits.checkpoint_gb:g} GiB "
                                 f"(limits.checkpoint_gb)")
    return end


def read_header(path: str | os.PathLike[str], *, roots: Roots | None = None,
                limits: LimitsConfig = DEFAULT_LIMITS) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries, `__metadata__`) of a safetensors file; raises `SafetensorsHeaderError`.

    Only the header is checked here; `inspect(...).complete` says whether the data is all there.
    """
    found = inspect(path, roots=roots, limits=limits)
    return found.tensors, found.metadata


def lora_problems(tensors: dict[str, Any]) -> list[str]:
    """Why these tensors cannot be applied as a LoRA (previewd.pipelines.lora reads them alike)."""
    bad = sorted(k for k in tensors if any(tag in k for tag in UNSUPPORTED_TAGS))
    if bad:
        return [f"unsupported LoRA variant (LoKr/LoHa/DoRA keys such as {bad[0][:80]!r}); only plain LoRA "
                "can be applied"]
    down: dict[str, list[int]] = {}
    up: dict[str, list[int]] = {}
    problems = []
    for key, entry in tensors.items():
        if match := LORA_WEIGHT.match(key):
            if entry["dtype"] not in _LORA_DTYPES:
                problems.append(f"{key[:80]!r} is {entry['dtype']}, not a floating-point tensor")
            (down if match["kind"] in ("lora_A", "lora_down") else up)[match["module"]] = entry["shape"]
        elif LORA_ALPHA.match(key):
            if math.prod(entry["shape"]) != 1:
                problems.append(f"{key[:80]!r} is not a single number")
        else:
            problems.append(f"{key[:80]!r} is not a LoRA weight (expected lora_A/lora_B or lora_down/lora_up)")
            break
    if not down and not problems:
        problems.append("no LoRA weights found (expected lora_A/lora_B or lora_down/lora_up keys)")
    halves = sorted(set(down) ^ set(up))
    if halves:
        problems.append(f"module {halves[0][:80]!r} has only one of its two LoRA matrices")
    for module in sorted(set(down) & set(up)):
        a, b = down[module], up[module]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] == 0:
            problems.append(f"module {module[:80]!r} has incompatible LoRA shapes {tuple(a)} / {tuple(b)}")
            break
    return problems


def nonfinite_tensors(path: str | os.PathLike[str], found: Header, *, chunk: int = 1 << 24) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity (the render would be black), read
    from `path`, a regular file of previewd's own (a snapshot), in chunks of `chunk` bytes."""
    import numpy as np

    start = 8 + found.header_bytes
    bad = []
    with open(path, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise CorruptSafetensors("not a regular file")
        for name, entry in sorted(found.tensors.items(), key=lambda item: item[1]["data_offsets"][0]):
            view = _FLOAT_EXPONENTS.get(entry["dtype"])
            if view is None:
                continue
            dtype, mask = view
            width = DTYPE_BYTES[entry["dtype"]]
            begin, stop = entry["data_offsets"]
            step = max(width, chunk - chunk % width)
            for offset in range(begin, stop, step):
                handle.seek(start + offset)
                values = np.frombuffer(handle.read(min(step, stop - offset)), dtype=dtype)
                if np.any((values & np.array(mask, dtype=dtype)) == mask):
                    bad.append(name)
                    break
    return bad
