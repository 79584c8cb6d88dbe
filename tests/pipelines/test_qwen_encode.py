"""Control-image routing and preprocessing per profile (previewd.pipelines.qwen.encode); no models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from previewd.errors import ControlImageError
from previewd.pipelines.qwen.encode import (
    edit_vae_image,
    open_control,
    plan_controls,
    text_encoder_size,
    text_encoder_tensor,
    to_unit_tensor,
)
from previewd.spec import ControlImage, RenderSpec


def _img(w, h, value):
    return Image.new("RGB", (w, h), (value, 2 * value % 256, 3 * value % 256))


def _spec(parity, slots):
    return RenderSpec(model="qwen_image_edit_plus", parity=parity, prompt="p",
                      control_images=tuple(ControlImage(slot=s, path=f"/{s}.png") for s in slots))


@pytest.mark.parametrize("area, aitk_hw", [(1024 * 1024, (896, 1184)), (384 * 384, (320, 448))])
def test_text_encoder_size_keeps_hw_in_aitk_and_swaps_in_reference(area, aitk_hw):
    # aitk-sampling.md §C.4 #4: a 1024x768 (W x H) control image.
    assert text_encoder_size(1024, 768, area, "aitk") == aitk_hw
    assert text_encoder_size(1024, 768, area, "reference") == aitk_hw[::-1]
    assert text_encoder_size(64, 64, area, "aitk") == text_encoder_size(64, 64, area, "reference")


def test_goldens_landscape_example():
    # goldens COMPARISON D2: a 96x64 control at 384^2 is 320x480 (H x W) in aitk, 480x320 in ref.
    assert text_encoder_size(96, 64, 384 * 384, "aitk") == (320, 480)
    assert text_encoder_size(96, 64, 384 * 384, "reference") == (480, 320)


def test_unit_tensor_matches_torchvision_to_tensor():
    from torchvision.transforms.functional import to_tensor

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    assert torch.equal(to_unit_tensor(img, "cpu", torch.float32), to_tensor(img).unsqueeze(0))


def test_text_encoder_tensor_shape_and_range():
    t = text_encoder_tensor(_img(96, 64, 40), 384 * 384, "aitk", "cpu", torch.float32)
    assert t.shape == (1, 3, 320, 480) and 0 <= float(t.min()) and float(t.max()) <= 1


def test_edit_plus_aitk_encodes_a_lone_ctrl_img_twice_and_the_vae_sees_it_once():
    a = _img(64, 64, 1)
    plan = plan_controls(_spec("aitk", ["ctrl_img"]), "multi", {"ctrl_img": a})
    assert [s for s, _ in plan.text_encoder] == ["ctrl_img", "ctrl_img_1"]
    assert all(img is a for _, img in plan.text_encoder)
    assert [s for s, _ in plan.vae] == ["ctrl_img"]


def test_edit_plus_reference_encodes_a_lone_ctrl_img_once():
    plan = plan_controls(_spec("reference", ["ctrl_img"]), "multi", {"ctrl_img": _img(64, 64, 1)})
    assert [s for s, _ in plan.text_encoder] == ["ctrl_img"] == [s for s, _ in plan.vae]


@pytest.mark.parametrize("parity", ["aitk", "reference"])
def test_edit_plus_numbered_slots_keep_their_order(parity):
    images = {s: _img(64, 64, i) for i, s in enumerate(["ctrl_img_1", "ctrl_img_2", "ctrl_img_3"])}
    plan = plan_controls(_spec(parity, list(images)), "multi", images)
    assert [s for s, _ in plan.text_encoder] == ["ctrl_img_1", "ctrl_img_2", "ctrl_img_3"]
    assert [s for s, _ in plan.vae] == ["ctrl_img_1", "ctrl_img_2", "ctrl_img_3"]


def test_edit_plus_ctrl_img_with_numbered_slots():
    images = {"ctrl_img": _img(64, 64, 9), "ctrl_img_1": _img(64, 64, 1), "ctrl_img_2": _img(64, 64, 2)}
    aitk = plan_controls(_spec("aitk", list(images)), "multi", images)
    assert [s for s, _ in aitk.text_encoder] == ["ctrl_img", "ctrl_img_1", "ctrl_img_2"]
    assert [s for s, _ in aitk.vae] == ["ctrl_img", "ctrl_img_2"]
    ref = plan_controls(_spec("reference", list(images)), "multi", images)
    assert [s for s, _ in ref.text_encoder] == ["ctrl_img_1", "ctrl_img_2"] == [s for s, _ in ref.vae]


def test_edit_resize_kernels():
    img = _img(96, 64, 7)
    same, kernel = edit_vae_image(_img(64, 64, 7), 64, 64, "aitk")
    assert kernel == "none" and same.size == (64, 64)
    aitk, k1 = edit_vae_image(img, 64, 64, "aitk")
    ref, k2 = edit_vae_image(img, 64, 64, "reference")
    assert (k1, k2) == ("bilinear", "lanczos")
    assert np.array_equal(np.asarray(aitk), np.asarray(img.resize((64, 64), Image.BILINEAR)))
    assert np.array_equal(np.asarray(ref), np.asarray(img.resize((64, 64), Image.LANCZOS)))


def test_unreadable_control_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ControlImageError):
        open_control(str(bad))
    with pytest.raises(ControlImageError):
        open_control(str(tmp_path / "missing.png"))
