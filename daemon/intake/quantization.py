"""ai-toolkit's quantisation settings, as previewd renders them (aitk-quantized.md §1, §4).

A run's `model:` section (or a request's `aitk:` block) says how ai-toolkit quantised the model it
sampled; this module turns that into the AitkOptions fields previewd renders with, says exactly what
previewd cannot reproduce, and finds the accuracy recovery adapter the way ai-toolkit finds it: a
local file, else `user/repo/file.safetensors` in the local Hugging Face cache (ai-toolkit downloaded
it there when it trained on this machine). previewd never downloads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from previewd.spec import QType

REPRODUCED: tuple[str, ...] = QType.__args__  # type: ignore[attr-defined]
DEFAULT_QTYPE = "qfloat8"


@dataclass(frozen=True)
class QuantizationSettings:
    """What previewd renders (`options`: AitkOptions fields), what it cannot reproduce (`gaps`), and
    what stops the run from rendering at all (`problems`)."""

    options: dict[str, Any] = field(default_factory=dict)
    gaps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def split_qtype(qtype: str) -> tuple[str, str | None]:
    """`"uint3|user/repo/file.safetensors"` -> ("uint3", the adapter path), as ModelConfig splits it."""
    name, bar, adapter = qtype.partition("|")
    return name, adapter if bar else None


def find_adapter(path: str, search: list[Path]) -> tuple[str | None, str | None]:
    """(what AitkOptions.ara holds, problem): a local file (a relative path tried in each `search`
    folder) as an absolute path, or a hub path `user/repo/file.safetensors` that is in the local cache."""
    given = Path(path).expanduser()
    tried = [given] if given.is_absolute() else [folder / given for folder in search]
    for candidate in tried:
        if candidate.is_file():
            return str(candidate.resolve()), None
    parts = path.split("/")
    where = ", ".join(str(p) for p in tried) or path
    if len(parts) != 3:
        return None, f"the accuracy recovery adapter {path!r} is not a file on this machine (tried {where})"
    repo, filename = "/".join(parts[:2]), parts[2]
    if _in_hf_cache(repo, filename):
        return path, None
    return None, (f"the accuracy recovery adapter {path!r} is neither a file on this machine (tried {where}) nor "
                  f"in the local Hugging Face cache, and previewd never downloads: fetch it with "
                  f"`hf download {repo} {filename}`")


def _in_hf_cache(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename)
    except Exception:  # an invalid repo id or an unreadable cache: either way it is not here
        return False
    return isinstance(found, str)


def of_run(model: dict[str, Any], model_id: str, *, where: str, search: list[Path]) -> QuantizationSettings:
    """A run's `model:` section (ModelConfig's keys and defaults) -> what previewd renders.

    `layer_offloading` turns qfloat8 into torchao's float8, which previewd does not reproduce; FLUX.2
    quantises its text encoder with `qtype` (ai-toolkit ignores `qtype_te` there).
    """
    quantize = bool(model.get("quantize", False))
    quantize_te = bool(model.get("quantize_te", quantize))
    qtype, adapter = split_qtype(str(model.get("qtype", DEFAULT_QTYPE)))
    qtype_te = qtype if model_id == "flux2" else str(model.get("qtype_te", DEFAULT_QTYPE))
    offloading = bool(model.get("layer_offloading", False))
    found = QuantizationSettings(options={"quantize_te": False})
    if quantize:
        effective = _offloaded(qtype, offloading)
        if effective in REPRODUCED:
            found.options.update(quantize=True, qtype=effective)
            if adapter is not None:
                found.options["ara"], problem = find_adapter(adapter, search)
                if problem:
                    found.problems.append(f"{where}.qtype: {problem}")
        else:
            found.gaps.append(f"ai-toolkit sampled a {_described(qtype, effective)} transformer, which previewd "
                              f"does not reproduce: it renders the transformer in full precision (with the LoRA "
                              f"unmerged, as ai-toolkit applied it), so small differences are expected")
    if quantize_te:
        effective = _offloaded(qtype_te, offloading)
        if effective in REPRODUCED:
            found.options.update(quantize_te=True, qtype_te=effective)
        else:
            found.gaps.append(f"ai-toolkit sampled with a {_described(qtype_te, effective)} text encoder, which "
                              f"previewd does not reproduce: it encodes prompts in full precision")
    return found


def _offloaded(qtype: str, offloading: bool) -> str:
    return "float8" if offloading and qtype == "qfloat8" else qtype


def _described(qtype: str, effective: str) -> str:
    if effective != qtype:
        return f"torchao {effective} (its {qtype} under layer_offloading)"
    return f"{qtype}-quantised"
