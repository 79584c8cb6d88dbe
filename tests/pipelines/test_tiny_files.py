"""What `previewd tiny-models` and the tiny LoRA writers leave on disk is readable as the umask
says, like every other file previewd writes: a service running as another user loads it."""

from __future__ import annotations

import os

import pytest

from previewd.pipelines.tiny import build_all
from previewd.pipelines.tiny.flux2 import write_bfl_lora
from previewd.pipelines.tiny.qwen import write_random_lora as write_qwen_lora

pytestmark = pytest.mark.slow


def test_tiny_weights_and_loras_have_the_umask_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        [folder] = build_all(tmp_path / "models", ["qwen_image_2512"]).values()
        qwen = write_qwen_lora(folder, tmp_path / "qwen.safetensors", seed=1)
        flux2 = write_bfl_lora(tmp_path / "flux2.safetensors", seed=1)
    finally:
        os.umask(previous)
    weights = sorted(folder.rglob("*.safetensors"))
    assert len(weights) == 3
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in [*weights, qwen, flux2]}
    assert set(modes.values()) == {"0o640"}, modes
